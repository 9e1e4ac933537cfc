"""`progan submit` against a Ray head started with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import dump_config
from progan.checkpoint import load_checkpoint
from tests import cluster_harness
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    """A Ray head as a user starts one (`ray start --head`, from the venv); its dashboard URL
    (for the Jobs API) and its GCS address."""
    import ray

    ray.shutdown()  # the head below is a separate cluster
    with cluster_harness.ray_head(num_cpus=2) as head:
        yield head.dashboard_url, head.address


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


def test_submit_prepare_and_tune_as_ray_jobs(ray_head, tmp_path):
    """`progan submit -- prepare ...` and `progan submit tune SPEC` run on the cluster as
    jobs; a bad spec or option is refused here, before the cluster is contacted."""
    import json

    import yaml

    from tests.test_tune import tiny_spec

    dashboard, _ = ray_head
    photos = make_tiny_dataset(tmp_path / "made", n=48, resolution=8).parent / "photos"
    out = tmp_path / "prepared"
    done = progan(
        "submit", "--address", dashboard, "--wait",
        "--", "prepare", str(photos), str(out), "--resolution", "8", "--detector", "none",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[0].startswith("progan-prepare-") and "SUCCEEDED" in done.stdout
    assert json.loads((out / "manifest.json").read_text())["records"] == 48

    spec = tiny_spec(tmp_path, out, search_space={"train.ema_beta": {"grid": [0.0]}})
    spec["base"]["model"]["resolution"] = 8
    spec["trial"]["schedule"] = {"start_resolution": 8, "transition_kimg": 0}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    bad = progan(
        "submit", "tune", str(path), "search.metric=nope", "--address", "http://127.0.0.1:1"
    )
    assert bad.returncode == 2 and "config error: search.metric" in bad.stdout, bad.stdout
    typo = progan(
        "submit", "--address", "http://127.0.0.1:1",
        "--", "prepare", "x", "y", "--resolution", "8", "--bogus",
    )  # fmt: skip
    assert typo.returncode == 2 and "--bogus" in typo.stderr, typo.stderr
    done = progan("submit", "tune", str(path), "--name", "s1", "--address", dashboard, "--wait")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[0] == "progan-tune-s1" and "SUCCEEDED" in done.stdout
    assert (tmp_path / "runs" / "tune" / "s1" / "summary.md").is_file()
