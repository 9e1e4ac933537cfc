"""MLflow tracking: one parent run per pipeline run, one nested child run per phase.

The embedded default store is a SQLite file under the runs root (`runs/mlflow.db`) with
artifacts beside it (`runs/mlartifacts`), so every local run can be compared in one UI.
Only rank 0 of a phase logs. Logging never crashes training: `MetricLogger` buffers what
could not be sent and retries on the next call; what is still unsent at the end goes to
the driver through Ray (pipeline.mailbox), which logs it itself or writes it beside the run,
and says so in the console and in a run tag. A cluster whose workers may run on other
nodes needs a tracking server (http/https); a local file store is refused there.
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
    """Rank-0 logging that never raises: buffers on failure, retries, and says what is lost.

    A worker has no disk the driver can read, so what could not be sent by `close()` is
    returned (and posted to the driver by the worker), never spilled to a local file.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.pending: list[Metric] = []
        self.pending_artifacts: list[tuple[str, str | None]] = []
        self.failures = 0
        self.first_error: str | None = None
        self.dropped_artifacts: list[str] = []
        self.skip_through = -1  # steps already in MLflow (a restarted worker repeats them)
        self.client = MlflowClient(tracking_uri=uri)

    def skip_logged(self, key: str, after: int) -> int:
        """After a restart from `after` images: skip steps this run already has for `key`
        (the restarted worker repeats them exactly). Returns the last logged step."""
        try:
            with fail_fast_http():
                steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
        except Exception as err:  # unknown: log everything again (the restart is tagged)
            log.warning("could not read %s's history from MLflow: %s", key, err)
            return after
        self.skip_through = max([s for s in steps if s > after], default=after)
        return self.skip_through

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.skip_through:
            return
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
                    else:  # its temporary folder is gone: say so at the end
                        self.dropped_artifacts.append(f"{artifact_path or ''}/{Path(path).name}")
                    self.pending_artifacts.pop(0)
            return True
        except Exception as err:  # tracking must never stop training
            self.failures += 1
            if self.first_error is None:
                self.first_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                log.warning("MLflow logging failed (%s); buffering and retrying", err)
            return False

    def close(self) -> dict[str, Any] | None:
        """Final flush. None if everything arrived, else what did not: the unsent metrics
        (as dicts), lost artifacts and the first error, for the driver to deal with."""
        self.flush()
        if not (self.pending or self.dropped_artifacts or self.failures):
            return None
        return {
            "error": self.first_error,
            "failures": self.failures,
            "unsent": [{"key": m.key, "value": m.value, "step": m.step} for m in self.pending],
            "lost_artifacts": self.dropped_artifacts
            + [f"{a or ''}/{Path(p).name}" for p, a in self.pending_artifacts],
        }


def is_local_store(uri: str) -> bool:
    """A SQLite file or a file store: readable only on the machine that holds it."""
    return not uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql", "mssql"))


def local_store_refusal(uri: str) -> str:
    """The one-line message for a local store on a cluster whose workers run elsewhere."""
    return (
        f"tracking.uri: {uri} is a file on this machine, but training workers may run on "
        "other nodes, which cannot write it. Start a tracking server every node can reach, "
        "e.g. `mlflow server --backend-store-uri sqlite:///PATH/mlflow.db --host 0.0.0.0 "
        "--port 5000` (on a trusted network), and pass tracking.uri=http://HOST:5000 "
        "(or set MLFLOW_TRACKING_URI)"
    )


def mlflow_settings() -> dict[str, str]:
    """This process's MLFLOW_* variables (tracking URI, auth, TLS options, timeouts)."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


def tracking_env(uri: str) -> dict[str, str]:
    """What MLflow needs in a worker's environment: the driver's MLflow settings, with the
    tracking URI the run resolved."""
    return {**mlflow_settings(), "MLFLOW_TRACKING_URI": uri}
