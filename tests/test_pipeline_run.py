"""The pipeline for real: Ray Train DDP phases, MLflow runs, failures and resume (tiny, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import dump_config
from pipeline.run import run_pipeline
from progan.checkpoint import load_checkpoint
from tests.conftest import REPO_ROOT
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"))


def runs_of(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("progan")
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def metric_steps(client: MlflowClient, run_id: str, key: str = "d_loss") -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def test_two_worker_ddp_run_is_tracked_in_mlflow(local_ray, dataset, tmp_path):
    cfg = tiny_pipeline_config(
        dataset,
        tmp_path,
        scaling={"num_workers": 2},
        eval={"enabled": True, "metrics": ["swd"], "num_images": 32},
    )
    ended: list[tuple[str, dict]] = []
    result = run_pipeline(cfg, "ddp", on_phase_end=lambda p, m: ended.append((p.name, m)))
    final = load_checkpoint(result.generator)
    assert final["images_shown"] == 288 and final["resolution"] == 8

    client, runs = runs_of(result.tracking_uri)
    parent = next(r for r in runs if r.info.run_id == result.parent_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [
        "00-0004-stabilize",
        "01-0008-transition",
        "02-0008-stabilize",
    ]
    assert parent.data.params["scaling.num_workers"] == "2"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "generator.pt",
        "phases.md",
    }
    for child in children:
        assert child.info.status == "FINISHED"
        tags = child.data.tags
        assert {"resolution", "phase_kind", "images", "ray_run_name", "git_commit"} <= set(tags)
        start = int(tags["phase_index"]) * 96
        assert metric_steps(client, child.info.run_id) == list(range(start + 16, start + 97, 16))
        arts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"samples", "checkpoint", "plots"} <= arts
        assert len(client.list_artifacts(child.info.run_id, "samples")) == 3  # 32, 64, end
    # end-of-phase SWD (8x8: one level; none at 4x4) in the phase runs, parent, and caller
    for child in children:
        has_swd = "SWDx1e3_8" in child.data.metrics
        assert has_swd == (child.data.tags["resolution"] == "8"), child.info.run_name
    assert metric_steps(client, parent.info.run_id, "SWDx1e3_avg") == [192, 288]
    assert [name for name, m in ended if "SWDx1e3_avg" in m] == [
        "01-0008-transition",
        "02-0008-stabilize",
    ]
    assert "SWD x1e3" in (result.run_dir / "phases.md").read_text()
    transition = next(c for c in children if c.info.run_name == "01-0008-transition")
    alphas = [m.value for m in client.get_metric_history(transition.info.run_id, "alpha")]
    assert alphas == sorted(alphas) and 0 < alphas[-1] < 1


def test_worker_killed_mid_phase_is_restarted_from_checkpoint(local_ray, dataset, tmp_path):
    cfg = tiny_pipeline_config(
        dataset, tmp_path, scaling={"num_workers": 2}, schedule={"start_resolution": 8}
    )
    result = run_pipeline(cfg, "fail", test_hooks={"fail_at_images": 48})
    assert (result.run_dir / ".failed-once-0").exists()  # the worker process did die
    assert load_checkpoint(result.generator)["images_shown"] == 96  # not double-counted
    client, runs = runs_of(result.tracking_uri)
    child = next(r for r in runs if r.info.run_name == "00-0008-stabilize")
    assert metric_steps(client, child.info.run_id) == list(range(16, 97, 16))


def test_driver_killed_mid_phase_resumes_to_the_uninterrupted_weights(local_ray, dataset, tmp_path):
    cfg = tiny_pipeline_config(dataset, tmp_path, schedule={"transition_kimg": 0})
    config = dump_config(cfg, tmp_path / "cfg.yaml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-id", "killed"],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ray_dir = tmp_path / "runs" / "killed" / "ray"
    deadline = time.time() + 240
    while not list(ray_dir.glob("killed-01-*/images-*")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = (tmp_path / "runs" / "killed" / "state.json").read_text()
    assert '"finished": false' in state

    resumed = run_pipeline(cfg, "killed")
    uninterrupted = run_pipeline(cfg, "clean")
    a, b = load_checkpoint(resumed.generator), load_checkpoint(uninterrupted.generator)
    assert a["images_shown"] == b["images_shown"] == 192
    for name, tensor in b["G_ema"].items():
        assert torch.equal(a["G_ema"][name], tensor), name

    client, runs = runs_of(resumed.tracking_uri)
    child = next(
        r
        for r in runs
        if r.info.run_name == "01-0008-stabilize"
        and r.data.tags["ray_run_name"].startswith("killed")
    )
    assert child.info.status == "FINISHED"
    assert metric_steps(client, child.info.run_id) == list(range(112, 193, 16))  # no gap


def test_two_node_cluster_runs_a_phase_across_both_nodes(dataset, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = tiny_pipeline_config(
            dataset, tmp_path, scaling={"num_workers": 2}, schedule={"start_resolution": 8}
        )
        # two workers needing 1 CPU each on two 1-CPU nodes: one worker per node
        result = run_pipeline(cfg, "cluster")
        assert load_checkpoint(result.generator)["images_shown"] == 96
    finally:
        ray.shutdown()
        cluster.shutdown()
