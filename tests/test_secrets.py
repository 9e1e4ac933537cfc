"""A token and a password given to `progan run` and `progan submit` are used, and recorded
nowhere: not in the run folder, storage, the MLflow store, the console, Ray's session logs,
or what Ray reports for the job (pipeline.tracking.secrets)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import dump_config
from pipeline.tracking.secrets import redact, redact_uri, runtime_env_vars, with_credentials
from tests import cluster_harness
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config

pytestmark = pytest.mark.slow


def test_redaction_and_references(monkeypatch):
    assert (
        redact_uri("postgresql://bob:s3cr3t@db:5432/mlflow")
        == "postgresql://bob:***@db:5432/mlflow"
    )
    assert redact_uri(
        "s3://AKIA:wJalr%2Fx@bucket/key"
    )  # "/" is %2F in a URI == "s3://AKIA:***@bucket/key"
    assert redact_uri("http://host:5000/path") == "http://host:5000/path"
    env = {"MLFLOW_TRACKING_TOKEN": "tok", "MLFLOW_TRACKING_URI": "http://u:p@h", "X": "1"}
    assert runtime_env_vars(env) == {
        "MLFLOW_TRACKING_TOKEN": "${MLFLOW_TRACKING_TOKEN}",
        "MLFLOW_TRACKING_URI": "${MLFLOW_TRACKING_URI}",
        "X": "1",
    }
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:p@h:1")
    assert with_credentials("http://u:***@h:1") == "http://u:p@h:1"
    assert with_credentials("http://u:***@elsewhere:1") == "http://u:***@elsewhere:1"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "a-long-token")
    assert redact("failed with a-long-token") == "failed with ***"


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under `root` whose bytes contain one of `needles`."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found += [f"{path} ({n[:4]!r}...)" for n in needles if n in data]
    return found


def progan(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "progan"
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400
    )


def test_a_token_and_a_password_reach_the_workers_and_are_recorded_nowhere(tmp_path):
    import ray

    ray.shutdown()  # this test's Ray clusters are its own
    token, password = f"tok-{secrets.token_hex(12)}", f"pw-{secrets.token_hex(8)}"
    needles = [token.encode(), password.encode()]
    dataset = make_tiny_dataset(tmp_path / "data", n=16, resolution=8)
    store = tmp_path / "mlflow"
    with cluster_harness.mlflow_server(store) as url:
        with_password = url.replace("http://", f"http://alice:{password}@")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
        env = {**base, "MLFLOW_TRACKING_TOKEN": token}

        # progan run, the password in the config; its local Ray in a temp dir of its own
        cfg = tiny_pipeline_config(
            dataset, tmp_path, schedule={"start_resolution": 8}, tracking={"uri": with_password}
        )
        config = dump_config(cfg, tmp_path / "run.yaml")
        assert password not in config.read_text()  # a config written by the project
        config.write_text(config.read_text().replace("alice:***@", f"alice:{password}@"))
        ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's sockets
        try:
            ran = progan(
                "run", str(config), "--run-id", "local", env={**env, "RAY_TMPDIR": str(ray_tmp)},
                cwd=tmp_path,
            )  # fmt: skip
            assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
            leaks = files_holding(ray_tmp, needles)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not leaks, leaks

        # progan submit, the password in MLFLOW_TRACKING_URI; the head's Ray has both
        # secrets in its environment (as an operator starts it, docs/using.md)
        secret_env = {"MLFLOW_TRACKING_TOKEN": token, "MLFLOW_TRACKING_URI": with_password}
        cfg = tiny_pipeline_config(dataset, tmp_path, schedule={"start_resolution": 8})
        config = dump_config(cfg, tmp_path / "job.yaml")
        with cluster_harness.ray_head(num_cpus=2, env=secret_env) as head:
            submitted = progan(
                "submit", str(config), "--address", head.dashboard_url, "--run-id", "job",
                "--wait", env={**env, **secret_env}, cwd=tmp_path,
            )  # fmt: skip
            assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
            listed = subprocess.run(
                [str(Path(sys.executable).parent / "ray"), "job", "list", "--address",
                 head.dashboard_url],
                capture_output=True, text=True, env=base, timeout=120,
            )  # fmt: skip
            assert listed.returncode == 0, listed.stderr[-2000:]
            assert "${MLFLOW_TRACKING_TOKEN}" in listed.stdout  # the reference, not the value
            from ray.job_submission import JobSubmissionClient

            info = JobSubmissionClient(head.dashboard_url).get_job_info("progan-job")
            recorded = str(info.runtime_env) + str(info.metadata) + info.entrypoint
            head_leaks = files_holding(head.temp_dir, needles)
        # the workers did log to the server, with the secrets from their node's environment
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("progan").experiment_id
        every = client.search_runs([experiment])
        runs = {r.info.run_name: r for r in every}
        for parent in ("local", "job"):
            [phase] = [
                r for r in every
                if r.data.tags.get("mlflow.parentRunId") == runs[parent].info.run_id
            ]  # fmt: skip
            steps = [m.step for m in client.get_metric_history(phase.info.run_id, "d_loss")]
            assert steps == list(range(16, 97, 16)), (parent, steps)

    said = ran.stdout + ran.stderr + submitted.stdout + submitted.stderr + listed.stdout
    for needle in (token, password):
        assert needle not in said
        assert needle not in recorded
    assert not head_leaks, head_leaks
    assert not files_holding(tmp_path / "runs", needles)  # run folders, their storage
    assert not files_holding(store, needles)  # the MLflow store and its artifacts
    assert "alice:***@" in (tmp_path / "runs" / "local" / "config.yaml").read_text()
