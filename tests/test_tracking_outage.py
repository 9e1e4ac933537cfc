"""Rank 0's MLflow logging against a real `mlflow server` that goes down and comes back
(and the driver's experiment tagging, on SQLite).

`pipeline.tracking.metric_logger.MetricLogger` only queues (training never waits on the server);
its sender keeps what the server refused and delivers it once the server is back. What is
still unsent when a phase ends goes to the driver, whose `Tracker.replay` logs it.
"""

from __future__ import annotations

import re
import time

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.tracking.metric_logger import MetricLogger
from pipeline.tracking.tracker import Tracker
from tests.cluster_harness import free_port, mlflow_server

pytestmark = pytest.mark.slow


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def image_steps(client: MlflowClient, run_id: str) -> list[int]:
    names = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    return sorted(int(re.search(r"\+step\+(\d+)\+", n).group(1)) for n in names)


def test_a_server_that_drops_and_comes_back_receives_everything(tmp_path):
    store, port = tmp_path / "mlflow", free_port()
    grid = tmp_path / "grid.png"
    Image.new("RGB", (20, 10), (200, 30, 30)).save(grid)
    with mlflow_server(store, port=port) as url:
        tracker = Tracker(url, "outage", tmp_path / "unused")
        phase, run = (tracker.start_run(n, {}) for n in ("phase", "run"))
        live = MetricLogger(url, {"phase": phase, "run": run}, retry_s=0.2)
        ending = MetricLogger(url, {"phase": phase, "run": run}, retry_s=0.2)
        live.log({"d_loss": 1.0}, 16)
        wait_for(lambda: live.pending() == 0, "the first values to arrive")

    # the server is down: logging still returns at once, the sender keeps everything
    live.log({"d_loss": 2.0, "resolution": 8}, 32)
    live.log_image(grid, "samples", 32, role="run")
    wait_for(lambda: live.failures > 0, "the sender to meet the dead server")
    assert live.pending() == 2 * 2 + 1  # two values for each of two runs, one grid
    ending.log({"g_loss": 3.0}, 48, to=("phase",))
    ending.log_image(grid, "samples", 48, role="run")
    undelivered = ending.close()  # a phase that ends while the server is away
    assert [(u["key"], u["step"]) for u in undelivered["unsent"]] == [("g_loss", 48)]
    assert [i["step"] for i in undelivered["unsent_images"]] == [48]
    assert undelivered["unsent_images"][0]["png"] == grid.read_bytes()

    with mlflow_server(store, port=port) as url:  # back, same store and address
        wait_for(lambda: live.pending() == 0, "the queue to drain into the restarted server")
        assert live.close() is None
        summary = Tracker(url, "outage", tmp_path / "unused").replay(undelivered, tmp_path / "k")
        assert "replayed by the driver" in summary

        client = MlflowClient(url)
        for run_id in (phase, run):
            assert steps(client, run_id, "d_loss") == [16, 32]
            assert steps(client, run_id, "resolution") == [32]
        assert steps(client, phase, "g_loss") == [48]
        assert steps(client, run, "g_loss") == []
        assert image_steps(client, run) == [32, 48]
        assert image_steps(client, phase) == []


def test_an_experiment_made_before_the_tag_is_tagged_a_training_experiment(tmp_path):
    """`progan run` on an existing experiment (e.g. from an older version) tags it, and
    leaves a kind the user chose alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "finetuning"})
    Tracker(uri, "older", tmp_path / "artifacts")
    Tracker(uri, "chosen", tmp_path / "artifacts")
    Tracker(uri, "new", tmp_path / "artifacts")
    for name in ("older", "new"):
        kind = client.get_experiment_by_name(name).tags["mlflow.experimentKind"]
        assert kind == "custom_model_development", name
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "finetuning"
