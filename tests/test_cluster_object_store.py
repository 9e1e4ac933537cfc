"""A 2-node cluster whose nodes share nothing but an S3 bucket (moto's server on 127.0.0.1).

The worker node runs in its own mount namespace (tests/cluster_harness.py) where the whole
test folder is an empty tmpfs: the dataset, Ray storage and MLflow's artifacts are in the
bucket only; the dataset is staged onto the worker node's own disk. Training runs only on
the worker node (custom resource `progan_worker`); the driver is `progan run --address` in
a child process, killed with kill -9 and continued with `progan resume`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import dump_config
from pipeline.driver.state import RunState
from preprocessing.staging import publish
from progan.checkpoint import load_checkpoint
from tests.cluster_harness import driver_env, mlflow_server, namespaced_cluster, unshare_available
from tests.conftest import REPO_ROOT
from tests.faults import progan_command
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config
from tests.s3_harness import s3_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("two_node_cluster"),  # one 2-node cluster at a time on the box
    pytest.mark.skipif(unshare_available() is not None, reason=f"{unshare_available()}"),
]
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def bucket_cluster(tmp_path_factory):
    import ray

    ray.shutdown()
    base = tmp_path_factory.mktemp("bucket-cluster")
    # the worker node's /etc/hosts: this machine's own name points nowhere there (a bucket
    # endpoint named by it is reachable from the driver only)
    node_files = tmp_path_factory.mktemp("node-files")
    hosts = node_files / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.3 {HOST}\n")
    with s3_server(base / "s3") as s3:
        local = make_tiny_dataset(base / "local")
        with pytest.MonkeyPatch.context() as mp:
            for key, value in s3.env.items():
                mp.setenv(key, value)
            publish(local, s3.uri("data/tiny"))
            with (
                namespaced_cluster(
                    [base],
                    worker_cpus=2,
                    worker_resources={"progan_worker": 2},
                    env=s3.env,
                    worker_files={Path("/etc/hosts"): hosts},
                ) as info,
                mlflow_server(
                    base / "mlflow", artifacts_destination=f"s3://{s3.bucket}/mlflow", env=s3.env
                ) as mlflow,
            ):
                yield SimpleNamespace(info=info, base=base, s3=s3, local=local, mlflow=mlflow)


def bucket_config(c, name: str, dataset: str):
    """3 tiny phases, one worker on the worker node; dataset, storage, artifacts in S3."""
    return tiny_pipeline_config(
        c.local,
        c.base,
        data={"dataset": dataset, "cache_dir": str(c.base / "cache")},
        scaling={"num_workers": 1, "resources_per_worker": {"progan_worker": 1}},
        run={"storage_path": c.s3.uri(f"ray-{name}"), "max_failures": 1},
        tracking={"uri": c.mlflow},
        eval={"enabled": True, "metrics": ["swd"], "num_images": 32},
    )


def wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the driver exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.2)


def test_only_a_bucket_shared_a_worker_killed_and_the_driver_killed_equal_one_local_run(
    bucket_cluster, tmp_path
):
    c = bucket_cluster
    cfg = bucket_config(c, "run", c.s3.uri("data/tiny"))
    config = dump_config(cfg, c.base / "bucket.yaml")
    run_dir = c.base / "runs" / "s3-two-node"
    log = tmp_path / "driver.log"
    address = ["--address", c.info.address]

    # the driver, killed with kill -9 once the first phase is done
    with open(log, "wb") as out:
        driver = subprocess.Popen(
            progan_command("run", str(config), "--run-id", "s3-two-node", *address),
            cwd=c.base, env=driver_env(c.s3.env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def first_phase_done() -> bool:
        try:
            return RunState.load(run_dir / "state.json").phase(0).done
        except (FileNotFoundError, ValueError, KeyError, IndexError):
            return False

    try:
        wait_for(first_phase_done, "first phase done", driver)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

    # resumed; its worker dies mid-phase 1 and Ray restarts it from the bucket
    marker = c.base / "worker-died"  # on the worker node's own tmpfs
    resumed = subprocess.run(
        progan_command("resume", str(run_dir), *address, fault=("worker-dies", "144", str(marker))),
        cwd=REPO_ROOT, env=driver_env(c.s3.env), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, log.read_text()[-2000:] + resumed.stdout[-3000:]
    assert not marker.exists()  # the worker wrote it on its own node, not here

    state = RunState.load(run_dir / "state.json")
    starts = [s for i in range(3) for s in state.phase(i).starts]
    assert state.finished and any(s["origin"] == "ray-checkpoint" for s in starts), starts
    assert all(state.phase(i).checkpoint.startswith("s3://progan-test/ray-run/") for i in range(3))
    keys = c.s3.objects()
    assert any(k.startswith("ray-run/s3-two-node-02-0008-stabilize/images-") for k in keys)
    # MLflow's artifacts (sample grids, the registered model) are in the bucket
    assert any(k.startswith("mlflow/") and "/images/samples" in k for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("model.safetensors") for k in keys)

    # the same training on one machine, local paths, no Ray: the same generator
    local = cfg.model_dump(mode="json")
    local["data"] = {"dataset": str(c.local)}
    local["scaling"] = {"num_workers": 1}
    local["run"].update(storage_path=None, root=str(tmp_path / "runs"))
    local["tracking"]["uri"] = None
    one = dump_config(cfg.model_validate(local), tmp_path / "local.yaml")
    out = subprocess.run(
        progan_command("train-local", str(one), "--out", str(tmp_path / "local")),
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    a = load_checkpoint(run_dir / "generator.pt")
    b = load_checkpoint(tmp_path / "local" / "generator.pt")
    assert a["images_shown"] == b["images_shown"] == 288
    for name, tensor in b["G_ema"].items():
        assert torch.equal(a["G_ema"][name], tensor), name


def test_a_bucket_the_worker_node_cannot_reach_fails_in_the_preflight_in_one_line(
    bucket_cluster, tmp_path
):
    c = bucket_cluster
    if socket.gethostbyname(HOST) != "127.0.0.1":
        pytest.skip(f"{HOST} does not resolve to 127.0.0.1 here")
    port = c.s3.endpoint.rsplit(":", 1)[1]
    dataset = c.s3.uri("data/tiny").replace(c.s3.endpoint, f"{HOST}:{port}")
    config = dump_config(bucket_config(c, "unreachable", dataset), tmp_path / "c.yaml")
    out = subprocess.run(
        progan_command("run", str(config), "--address", c.info.address),
        cwd=tmp_path, env=driver_env(c.s3.env), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    [line] = [ln for ln in out.stdout.splitlines() if "preflight" in ln]
    assert re.search(r"preflight: node \S+ \(.*, node [0-9a-f]{8}\)", line), line  # which node
    assert "data.dataset s3://progan-test/data/tiny is not reachable from this node" in line
    assert "endpoint_override" not in out.stdout  # the URI as a user reads it
    assert "Traceback" not in out.stdout + out.stderr
    assert not [k for k in c.s3.objects("ray-unreachable/") if "-stabilize" in k], "a phase ran"
