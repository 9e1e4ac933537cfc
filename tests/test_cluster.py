"""The pipeline on a 2-node Ray cluster whose worker node sees only what a remote node would.

The worker node runs in its own mount namespace (tests/cluster_harness.py): the driver's
folder (run root, MLflow server store, its own temp files) and the head's Ray temp dir are
empty tmpfs mounts there. The two share a "shared storage" folder and the loopback network.
Every training worker needs the custom resource `progan_worker`, which only the worker node
has, and MLflow is a real `mlflow server` on 127.0.0.1. What the driver's disk holds, a
worker cannot read: phases must hand off through storage, metrics through the server.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import dump_config
from pipeline.driver.state import RunState
from pipeline.tools.model_uri import downloaded_generator
from progan.checkpoint import load_checkpoint
from tests import faults
from tests.cluster_harness import driver_env, mlflow_server, namespaced_cluster, unshare_available
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("two_node_cluster"),  # one worker, one cluster for the module
    pytest.mark.skipif(unshare_available() is not None, reason=f"{unshare_available()}"),
]
PHASES = ["00-0004-stabilize", "01-0008-transition", "02-0008-stabilize"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    ray.shutdown()  # this module's driver joins the cluster below, not a local Ray
    base = tmp_path_factory.mktemp("cluster")
    driver, shared = base / "driver", base / "shared"
    driver.mkdir()
    dataset = make_tiny_dataset(shared / "data")
    with (
        namespaced_cluster([driver], worker_cpus=2, worker_resources={"progan_worker": 2}) as info,
        mlflow_server(driver / "mlflow") as uri,
    ):
        yield SimpleNamespace(info=info, driver=driver, shared=shared, dataset=dataset, mlflow=uri)
    ray.shutdown()


def cluster_config(c, **sections):
    """3 tiny phases, 2 DDP workers on the worker node, storage and MLflow shared."""
    raw = {
        "scaling": {"num_workers": 2, "resources_per_worker": {"progan_worker": 1}},
        "run": {"storage_path": f"file://{c.shared / 'ray'}", "max_failures": 1},
        "tracking": {"uri": c.mlflow},
        "eval": {"enabled": True, "metrics": ["swd"], "num_images": 32},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return tiny_pipeline_config(c.dataset, c.driver, **raw)


def progan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "progan"
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=driver_env(), capture_output=True, text=True, timeout=300
    )


def test_a_sqlite_store_is_refused_when_workers_run_on_another_node(cluster):
    cfg = cluster_config(cluster)
    config = dump_config(cfg, cluster.driver / "sqlite.yaml")
    out = progan(
        "run",
        str(config),
        "tracking.uri=null",
        "--address",
        cluster.info.address,
        cwd=cluster.driver,
    )
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    [line] = [ln for ln in out.stdout.splitlines() if "config error" in ln]
    assert "sqlite:///" in line and "mlflow server --backend-store-uri" in line


def test_a_dataset_only_the_driver_sees_fails_in_the_preflight(cluster):
    private = cluster.driver / "private-data"
    shutil.copytree(cluster.dataset, private)
    cfg = cluster_config(cluster, data={"dataset": str(private)})
    config = dump_config(cfg, cluster.driver / "private.yaml")
    out = progan("run", str(config), "--address", cluster.info.address, cwd=cluster.driver)
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    [line] = [ln for ln in out.stdout.splitlines() if "preflight" in ln]
    assert f"data.dataset {private}" in line and "not readable" in line, line
    assert re.search(r"preflight: node \S+ \(.*, node [0-9a-f]{8}\)", line), line  # which node
    assert not list((cluster.shared / "ray").glob("*-00-0004-stabilize")), "a phase started"


def test_storage_only_the_driver_sees_fails_in_the_preflight(cluster):
    private = cluster.driver / "private-ray"
    cfg = cluster_config(cluster, run={"storage_path": str(private)})
    config = dump_config(cfg, cluster.driver / "private-storage.yaml")
    out = progan("run", str(config), "--address", cluster.info.address, cwd=cluster.driver)
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    [line] = [ln for ln in out.stdout.splitlines() if "preflight" in ln]
    assert f"run.storage_path: {private} is not the driver's storage here" in line, line
    assert not list(private.glob(".preflight*")), "the probe was not cleaned up"


def test_three_phases_on_the_worker_node_with_a_worker_killed_equal_one_node(
    cluster, tmp_path, monkeypatch
):
    import ray

    from pipeline.driver.ray_session import start_ray
    from pipeline.driver.run import run_pipeline

    cfg = cluster_config(cluster, run={"root": str(cluster.driver / "runs")})
    start_ray(cluster.info.address)  # joins the cluster, shipping the project's code
    [head] = [n for n in ray.nodes() if n["NodeID"] == cluster.info.head_node_id]
    assert "progan_worker" not in head["Resources"]  # training can only run in the namespace
    marker, env_file = cluster.shared / "died", cluster.shared / "worker-env.json"
    hooks = {"fail_at_images": 144, "fail_marker": str(marker), "env_file": str(env_file)}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "17")  # an MLflow setting of the driver
    result = run_pipeline(cfg, "two-node", test_hooks=hooks, worker_fn=faults.dies_once)
    ray.shutdown()

    # MLflow's settings reached the workers on the other node through the runtime env
    env = json.loads(env_file.read_text())
    assert env["MLFLOW_TRACKING_URI"] == cluster.mlflow
    assert env["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "17"

    # a worker on the other node died mid-phase 1 and Ray restarted it from storage
    assert marker.read_text() == "144"
    state = RunState.load(result.run_dir / "state.json")
    assert [s["origin"] for s in state.phase(0).starts] == ["scratch"]
    assert state.phase(1).starts == [
        {"origin": "previous-phase", "images": 96},
        {"origin": "ray-checkpoint", "images": 128},
    ]
    # phases handed off through storage, not the driver's run dir
    assert all(state.phase(i).checkpoint.startswith("file://") for i in range(3))
    assert not (result.run_dir / "checkpoints").exists()

    # metrics, sample grids and the generator are in the MLflow server
    client = MlflowClient(cluster.mlflow)
    runs = client.search_runs([client.get_experiment_by_name("progan").experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert sorted(children) == PHASES
    for i, name in enumerate(PHASES):
        steps = [m.step for m in client.get_metric_history(children[name].info.run_id, "d_loss")]
        assert steps == list(range(i * 96 + 16, i * 96 + 97, 16)), name
        assert children[name].info.status == "FINISHED"
    assert "SWDx1e3_avg" in children[PHASES[2]].data.metrics
    parent = client.get_run(result.parent_run_id)
    grids = [a for a in client.list_artifacts(parent.info.run_id, "images") if ".png" in a.path]
    assert len(grids) == 9  # 3 a phase, uploaded from the other node through the server
    [version] = client.search_model_versions("name='progan'")
    assert version.run_id == parent.info.run_id
    with downloaded_generator(f"models:/progan/{version.version}", cluster.mlflow) as file:
        served = shutil.copy(file, tmp_path / "served.pt")

    # the same run on one node (a local Ray, SQLite) gives the same generator
    single = cfg.model_dump(mode="json")
    single["scaling"]["resources_per_worker"] = {}
    single["run"].update(storage_path=None, root=str(tmp_path / "runs"))
    single["tracking"]["uri"] = None
    config = dump_config(cfg.model_validate(single), tmp_path / "single.yaml")
    out = progan("run", str(config), "--run-id", "one-node", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    a, b = load_checkpoint(served), load_checkpoint(tmp_path / "runs/one-node/generator.pt")
    assert a["images_shown"] == b["images_shown"] == 288
    for name, tensor in b["G_ema"].items():
        assert torch.equal(a["G_ema"][name], tensor), name
