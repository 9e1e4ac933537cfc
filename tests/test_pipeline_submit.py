"""`progan submit` against a Ray head started with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import dump_config
from progan.checkpoint import load_checkpoint
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    import ray

    ray.shutdown()  # the head below is a separate cluster
    ray_bin = str(Path(sys.executable).parent / "ray")
    port, dash = free_port(), free_port()
    # as a user would: the head started from the activated venv, so jobs' `python` is it
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": path}
    subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    try:
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)


def progan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`progan ARGS` as a user types it (stdout and stderr together)."""
    progan_bin = Path(sys.executable).parent / "progan"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [str(progan_bin), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_submit_runs_the_pipeline_as_a_ray_job(ray_head, tmp_path):
    ray_head, gcs = ray_head
    dataset = make_tiny_dataset(tmp_path, n=16, resolution=8)
    cfg = tiny_pipeline_config(dataset, tmp_path, schedule={"start_resolution": 8})
    config = dump_config(cfg, tmp_path / "job.yaml")
    done = progan("submit", str(config), "--address", ray_head, "--run-id", "job1", "--wait")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = done.stdout.splitlines()[0].strip()
    assert job_id == "progan-job1" and "SUCCEEDED" in done.stdout
    assert load_checkpoint(tmp_path / "runs" / "job1" / "generator.pt")["images_shown"] == 96
    status = progan("status", job_id, "--address", ray_head)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = progan("logs", job_id, "--address", ray_head)
    assert logs.returncode == 0 and "done" in logs.stdout

    # the same run id again (as after a failed job): a new job id, and it continues the run
    again = progan("submit", str(config), "--address", ray_head, "--run-id", "job1", "--wait")
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.splitlines()[0].strip() == "progan-job1-2"
    assert "all phases done" in again.stdout and "SUCCEEDED" in again.stdout
    follow = progan("logs", "progan-job1-2", "--follow", "--address", ray_head)
    assert follow.returncode == 0 and "all phases done" in follow.stdout

    # `progan run --address` from another directory: the driver here, the work on the head
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = progan("run", str(config), "--run-id", "direct", "--address", gcs, cwd=elsewhere)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "preflight: nodes ok" in out.stdout
    assert load_checkpoint(tmp_path / "runs" / "direct" / "generator.pt")["images_shown"] == 96


def test_submit_refuses_a_bad_config_before_contacting_the_cluster(tmp_path):
    cfg = tiny_pipeline_config(tmp_path / "d", tmp_path)
    config = dump_config(cfg, tmp_path / "job.yaml")
    out = progan("submit", str(config), "train.loss=nope", "--address", "http://127.0.0.1:1")
    assert out.returncode == 2
    assert "config error: train.loss" in out.stdout
