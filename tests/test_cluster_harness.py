"""Smoke test of tests/cluster_harness.py: the namespaced worker node and the MLflow server."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from tests.cluster_harness import (
    group_pids,
    mlflow_server,
    namespaced_cluster,
    processes_mentioning,
    unshare_available,
)

pytestmark = pytest.mark.slow

_NO_UNSHARE = unshare_available()


def _look_around(driver_file: str, shared_file: str, head_temp_dir: str) -> dict:
    """Runs on the worker node: what this node can see of the driver's and head's files."""
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "driver_file_exists": os.path.exists(driver_file),
        "driver_dir_content": os.listdir(os.path.dirname(driver_file)),  # an empty tmpfs
        "shared_text": Path(shared_file).read_text(),
        "head_temp_dir_content": os.listdir(head_temp_dir),
        "payload": b"x" * (2 << 20),  # > the inline limit: the driver pulls it from this node
    }


def _log_to_mlflow(tracking_uri: str, experiment: str) -> tuple[str, str]:
    """Runs on the worker node: a metric and an artifact over HTTP; returns (run id, node id)."""
    import tempfile

    import ray
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(client.create_experiment(experiment))
    client.log_metric(run.info.run_id, "smoke", 0.5, step=3)
    with tempfile.TemporaryDirectory() as tmp:
        note = Path(tmp) / "note.txt"
        note.write_text("from the worker node")
        client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    return run.info.run_id, ray.get_runtime_context().get_node_id()


@pytest.mark.skipif(_NO_UNSHARE is not None, reason=str(_NO_UNSHARE))
def test_namespaced_worker_node_and_mlflow_server(tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    driver, shared = tmp_path / "driver", tmp_path / "shared"
    driver.mkdir()
    shared.mkdir()
    (driver / "secret.txt").write_text("driver only")
    (shared / "data.txt").write_text("shared data")

    ray.shutdown()  # another test's local Ray, if any
    t0 = time.monotonic()
    with namespaced_cluster([driver], worker_resources={"progan_worker": 2}) as info:
        t_cluster = time.monotonic() - t0
        try:
            ray.init(address=info.address, log_to_driver=False)
            look = ray.remote(_look_around).options(resources={"progan_worker": 1}, num_cpus=1)
            seen = ray.get(
                look.remote(
                    str(driver / "secret.txt"), str(shared / "data.txt"), str(info.head_temp_dir)
                )
            )
            assert seen["node_id"] == info.worker_node_id != info.head_node_id
            assert seen["driver_file_exists"] is False and seen["driver_dir_content"] == []
            assert seen["shared_text"] == "shared data"
            assert seen["head_temp_dir_content"] == []
            assert len(seen["payload"]) == 2 << 20
            # The driver, in the host namespace, sees all of it.
            assert (driver / "secret.txt").exists() and any(info.head_temp_dir.iterdir())
            with urllib.request.urlopen(f"{info.dashboard_url}/api/jobs/", timeout=10) as r:
                assert isinstance(json.load(r), list)  # the Jobs API answers

            t1 = time.monotonic()
            with mlflow_server(tmp_path / "mlflow") as uri:
                t_mlflow = time.monotonic() - t1
                log = ray.remote(_log_to_mlflow).options(resources={"progan_worker": 1})
                run_id, node_id = ray.get(log.remote(uri, "smoke"))
                assert node_id == info.worker_node_id
                client = MlflowClient(tracking_uri=uri)
                history = client.get_metric_history(run_id, "smoke")
                assert [(m.value, m.step) for m in history] == [(0.5, 3)]
                assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
                text = Path(client.download_artifacts(run_id, "note.txt", str(tmp_path)))
                assert text.read_text() == "from the worker node"
                assert processes_mentioning(str(tmp_path / "mlflow"))  # the server's
        finally:
            ray.shutdown()
    print(f"\ncluster start {t_cluster:.1f}s, mlflow server start {t_mlflow:.1f}s")

    # Nothing of the cluster nor the server is left.
    assert group_pids(info.head_pgid) == [] and group_pids(info.worker_pgid) == []
    assert processes_mentioning(str(info.head_temp_dir)) == []
    assert processes_mentioning(str(info.worker_temp_dir)) == []
    assert not info.head_temp_dir.exists() and not info.worker_temp_dir.exists()
    assert processes_mentioning(str(tmp_path / "mlflow")) == []
