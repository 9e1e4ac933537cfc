"""MLflow tracking: one parent run per pipeline run, one nested child run per phase.

The embedded default store is a SQLite file under the runs root (`runs/mlflow.db`) with
artifacts beside it (`runs/mlartifacts`), so every local run can be compared in one UI.
Only rank 0 of a phase logs. Logging never crashes training: `MetricLogger` buffers what
could not be sent, retries on the next call, and at the end writes anything still unsent
to a JSONL file beside the run and says so.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 6000


class TrackingError(RuntimeError):
    """The tracking server cannot be used."""


def default_store(root: str | os.PathLike) -> str:
    """sqlite URI of the embedded store under the runs root."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def resolve_uri(configured: str | None, root: str | os.PathLike) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_store(root)


@contextmanager
def fail_fast_http():
    """Make MLflow's HTTP client give up quickly (it retries for minutes by default)."""
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'model.resolution': '32', ...} as MLflow params."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return {k: v[:MAX_PARAM_LENGTH] for k, v in out.items()}


def git_commit() -> str:
    """The project's git commit, or 'unknown'."""
    try:
        here = Path(__file__).resolve().parent
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Driver-side run management: experiment, parent run, child runs, artifacts."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | os.PathLike) -> None:
        self.uri = uri
        with fail_fast_http():
            try:
                self.client = MlflowClient(tracking_uri=uri)
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    location = None
                    if uri.startswith("sqlite:") or uri.startswith("file:"):
                        location = (Path(artifact_root).resolve()).as_uri()
                    self.experiment_id = self.client.create_experiment(experiment, location)
                else:
                    self.experiment_id = found.experiment_id
            except Exception as err:  # any failure here means "unusable"
                raise TrackingError(
                    f"MLflow tracking at {uri} is unreachable or unusable: "
                    f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                ) from err

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        """Create a run (nested under `parent_id` if given); returns its id."""
        tags = {**tags, "git_commit": git_commit()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again (resume)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        existing = self.client.get_run(run_id).data.params
        items = [p for p in items if p.key not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def log_artifact(
        self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None
    ) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(
            run_id, status=RunStatus.to_string(RunStatus.from_string(status))
        )


class MetricLogger:
    """Rank-0 logging that never raises: buffers on failure, retries, reports gaps."""

    def __init__(self, uri: str, run_id: str, spill_dir: str | os.PathLike) -> None:
        self.uri, self.run_id = uri, run_id
        self.spill_dir = Path(spill_dir)
        self.pending: list[Metric] = []
        self.pending_artifacts: list[tuple[str, str | None]] = []
        self.failures = 0
        self.client = MlflowClient(tracking_uri=uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self.flush()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.pending_artifacts.append((str(path), artifact_path))
        self.flush()

    def flush(self) -> bool:
        """Send what is pending; False (and keep it) if the server is unreachable."""
        try:
            with fail_fast_http():
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                    del self.pending[:1000]
                while self.pending_artifacts:
                    path, artifact_path = self.pending_artifacts[0]
                    if Path(path).exists():
                        self.client.log_artifact(self.run_id, path, artifact_path)
                    self.pending_artifacts.pop(0)
            return True
        except Exception as err:  # tracking must never stop training
            self.failures += 1
            if self.failures == 1:
                log.warning("MLflow logging failed (%s); buffering and retrying", err)
            return False

    def close(self) -> Path | None:
        """Final flush; spill unsent metrics to JSONL and return its path if any remain."""
        if self.flush() or not self.pending:
            return None
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"unlogged-metrics-{self.run_id}.jsonl"
        with path.open("a") as f:
            for m in self.pending:
                f.write(json.dumps({"key": m.key, "value": m.value, "step": m.step}) + "\n")
        log.warning("%d metrics could not reach MLflow; written to %s", len(self.pending), path)
        return path
