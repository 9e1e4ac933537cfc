"""MLflow tracking, driver side: the experiment, one parent run per pipeline run, one nested
child run per phase, the dataset input and tables.

The experiment is tagged a model-training experiment (`mlflow.experimentKind`), so MLflow 3's
UI opens its training view rather than the GenAI one. The embedded default store is a SQLite
file under the runs root (`runs/mlflow.db`) with artifacts beside it (`runs/mlartifacts`),
so every local run can be compared in one UI. Rank 0 of a phase logs through
pipeline.tracking.metric_logger (queued, never blocking training); the registered model is
pipeline.tools.registry's. A cluster whose workers may run on other nodes needs a
tracking server (http/https); a local file store is refused there.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from pipeline.tracking.secrets import has_password, redact, redact_uri, with_credentials

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 6000
# MLflow 3's UI reads this experiment tag: this value opens the model-training view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class TrackingError(RuntimeError):
    """The tracking server cannot be used."""


def default_store(root: str | os.PathLike) -> str:
    """sqlite URI of the embedded store under the runs root."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def training_view_url(base: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow 3's model-training view. MLflow 3.17's UI picks the
    view from a per-browser switch (GenAI by default) that this URL parameter overrides;
    the experiment's `mlflow.experimentKind` tag is what other MLflow UIs read."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def resolve_uri(configured: str | None, root: str | os.PathLike) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else the embedded SQLite store (a password
    the saved config left out comes back from $MLFLOW_TRACKING_URI: tracking.secrets)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or default_store(root)
    return with_credentials(uri)


_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
_fail_fast_lock = threading.Lock()
_fail_fast_users = 0
_fail_fast_saved: dict[str, str | None] = {}


@contextmanager
def fail_fast_http():
    """Make MLflow's HTTP client give up quickly (it retries for minutes by default).

    MLflow reads these settings from the environment, which the whole process shares: the
    first block in sets them and the last one out restores them, whatever the threads."""
    global _fail_fast_users
    with _fail_fast_lock:
        if _fail_fast_users == 0:
            _fail_fast_saved.update({k: os.environ.get(k) for k in _FAIL_FAST})
            os.environ.update(_FAIL_FAST)
        _fail_fast_users += 1
    try:
        yield
    finally:
        with _fail_fast_lock:
            _fail_fast_users -= 1
            if _fail_fast_users == 0:
                for k, v in _fail_fast_saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


@contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, artifact downloads) on `uri` for the block. MLflow
    keeps the URIs in globals and in MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI (for
    subprocesses); both are put back as they were."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


OUTAGE_SIGNS = (
    "Connection refused",
    "ConnectionError",
    "Max retries exceeded",
    "Read timed out",
    "RemoteDisconnected",
    "502",
    "503",
    "504",
)


def is_outage(err: BaseException) -> bool:
    """An error that says the server is away (not that the request was wrong)."""
    text = f"{type(err).__name__}: {err}"
    return isinstance(err, ConnectionError | TimeoutError) or any(s in text for s in OUTAGE_SIGNS)


class PatientClient:
    """An MlflowClient whose calls wait out a server outage (a restart) for up to
    `wait_s`, telling `say` once per outage; other errors are raised at once."""

    def __init__(self, client: MlflowClient, wait_s: float, say: Callable[[str], None]) -> None:
        self._client, self.wait_s, self.say = client, wait_s, say

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            deadline, delay, told = time.monotonic() + self.wait_s, 1.0, False
            while True:
                try:
                    with fail_fast_http():
                        result = attr(*args, **kwargs)
                    if told:
                        self.say("MLflow server answers again; the run goes on")
                    return result
                except Exception as err:
                    if not is_outage(err) or time.monotonic() + delay > deadline:
                        raise
                    if not told:
                        self.say(
                            f"MLflow server {redact_uri(self._client.tracking_uri)} does not "
                            f"answer ({name}); waiting up to {self.wait_s:.0f} s "
                            "(tracking.outage_wait_s) for it"
                        )
                        told = True
                    time.sleep(delay)
                    delay = min(delay * 2, 15.0)

        return call


class Tracker:
    """Driver-side run management: experiment, parent run, child runs, artifacts.

    With `outage_wait_s`, every call after the first contact waits out a server outage
    (PatientClient); the first contact fails fast (TrackingError): a server that is down at
    the start is a setup problem."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_root: str | os.PathLike,
        outage_wait_s: float = 0.0,
        say: Callable[[str], None] = log.warning,
    ) -> None:
        self.uri = uri
        if has_password(uri):  # MLflow prints run links with the URI as given: not its password
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        with fail_fast_http():
            try:
                self.client = MlflowClient(tracking_uri=uri)
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    location = None
                    if uri.startswith("sqlite:") or uri.startswith("file:"):
                        location = (Path(artifact_root).resolve()).as_uri()
                    self.experiment_id = self.client.create_experiment(
                        experiment, location, tags=dict([EXPERIMENT_KIND])
                    )
                else:
                    self.experiment_id = found.experiment_id
                    if EXPERIMENT_KIND[0] not in found.tags:  # made before it was tagged
                        self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
            except Exception as err:  # any failure here means "unusable"
                raise TrackingError(
                    f"MLflow tracking at {redact_uri(uri)} is unreachable or unusable: "
                    f"{type(err).__name__}: {redact(str(err).splitlines()[0][:200])}"
                ) from err
        if outage_wait_s > 0:
            self.client = PatientClient(self.client, outage_wait_s, say)  # type: ignore[assignment]

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        """Create a run (nested under `parent_id` if given); returns its id."""
        commit = git_commit()
        tags = {
            "mlflow.source.type": "LOCAL",
            "mlflow.source.name": "progan run",
            "mlflow.source.git.commit": commit,
            **{k: redact_uri(str(v)) for k, v in tags.items()},
            "git_commit": commit,
        }
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again (resume)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        """Params not logged yet (a resumed run keeps its first values); URIs redacted."""
        items = [Param(k, redact_uri(str(v))) for k, v in params.items()]
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

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows (one dict each) as an MLflow table artifact (the run's Artifacts tab shows it)."""
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = {c: [row.get(c) for row in rows] for c in columns}
        self.client.log_table(run_id, table, artifact_file)

    def log_dataset(self, run_id: str, dataset_dir: str | os.PathLike) -> None:
        """The prepared dataset as the run's training input: the runs table's Dataset column."""
        self.client.log_inputs(run_id, datasets=[dataset_input(dataset_dir)])

    def replay(self, undelivered: dict[str, Any], keep_dir: Path) -> str:
        """Log what a worker could not deliver (pipeline.metric_logger's `close()`): metrics
        and sample grids; what fails here too is written to `keep_dir`. Returns a summary
        for the console and the run's `tracking.incomplete` tag."""
        metrics, images = undelivered.get("unsent", []), undelivered.get("unsent_images", [])
        lost = undelivered.get("lost_artifacts", [])
        note = (
            f"{len(metrics)} metric values, {len(images)} sample grids and {len(lost)} "
            f"artifacts undelivered ({undelivered.get('error')})"
        )
        if not metrics and not images:
            return note + (f"; lost artifacts: {', '.join(lost)[:400]}" if lost else "")
        try:
            with fail_fast_http():
                by_run_step: dict[tuple[str, int], dict[str, float]] = {}
                for m in metrics:
                    by_run_step.setdefault((m["run_id"], int(m["step"])), {})[m["key"]] = m["value"]
                for (run_id, step), values in by_run_step.items():
                    self.log_metrics(run_id, values, step)
                for image in images:
                    self.log_image_bytes(image["run_id"], image["png"], image["key"], image["step"])
            where = "the metrics were logged from the driver instead: replayed by the driver"
        except Exception as err:
            keep_dir.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(m) + "\n" for m in metrics)
            (keep_dir / "metrics.jsonl").write_text(lines)
            for image in images:
                (keep_dir / f"{image['key']}-{image['step']:012d}.png").write_bytes(image["png"])
            where = f"the driver could not log them ({type(err).__name__}): kept in {keep_dir}"
        summary = f"{note}; {where}"
        return summary + (f"; lost artifacts: {', '.join(lost)[:400]}" if lost else "")

    def log_image_bytes(self, run_id: str, png: bytes, key: str, step: int) -> None:
        """A PNG (bytes) as image `key` at `step`."""
        import io

        from PIL import Image

        with Image.open(io.BytesIO(png)) as image:
            self.client.log_image(run_id, image.convert("RGB"), key=key, step=step)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(
            run_id, status=RunStatus.to_string(RunStatus.from_string(status))
        )

    def try_finish(self, run_id: str, status: str) -> str | None:
        """`finish` once, failing fast, for a run that is stopping (Ctrl-C, an error): it
        must neither wait for the server nor replace the error that stops the run. Returns
        what went wrong, or None."""
        client = getattr(self.client, "_client", self.client)  # not the patient one
        try:
            with fail_fast_http():
                client.set_terminated(run_id, status=status)
        except Exception as err:
            return f"{type(err).__name__}: {redact(str(err).splitlines()[0][:160])}"
        return None


def dataset_input(dataset_dir: str | os.PathLike) -> DatasetInput:
    """An MLflow dataset input for a prepared dataset: its folder name, location, manifest
    fingerprint (the digest) and, as its profile, resolutions, image counts and raw source."""
    from preprocessing.lmdb_store import read_manifest
    from preprocessing.object_store import display, is_uri

    remote = is_uri(dataset_dir)
    location = display(dataset_dir) if remote else str(Path(dataset_dir).resolve())
    manifest = read_manifest(dataset_dir)
    source = manifest.get("source", {})
    profile = {
        "resolution": max(int(r) for r in manifest["counts"]),
        "images": manifest.get("records"),
        "counts": manifest["counts"],
        "raw_source": source.get("path"),
        "raw_source_kind": source.get("kind"),
        "fingerprint": manifest["fingerprint"],
    }
    dataset = Dataset(
        name=location.rstrip("/").rsplit("/", 1)[-1],
        digest=str(manifest["fingerprint"])[:16],
        source_type=location.split("://")[0] if remote else "local",
        source=json.dumps({"uri": location}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


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
    tracking URI the run resolved. It holds secrets: a runtime env gets it through
    tracking.secrets.runtime_env_vars."""
    return {**mlflow_settings(), "MLFLOW_TRACKING_URI": uri}
