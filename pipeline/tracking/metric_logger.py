"""Rank 0's MLflow logging: queued, sent by a background thread, never lost silently.

Training never waits on the tracking server: `log` and `log_image` only queue (sample
grids are spilled as PNG files to a local folder first) and a sender thread delivers the
queue in order, keeping whatever the server refused and retrying it, so a server that
drops and comes back receives everything. MLflow's own asynchronous logging
(`synchronous=False`) drops a batch that fails (mlflow/utils/async_logging logs the error
and moves on), hence this queue. `close()` stops the sender, tries once more and returns
what is still unsent (metrics, and grids as PNG bytes) for the worker to post to the
driver (pipeline.phases.mailbox), which logs it itself or keeps it in the run directory.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.tracking.secrets import with_credentials
from pipeline.tracking.tracker import fail_fast_http

log = logging.getLogger(__name__)
BATCH = 1000  # metrics per log_batch call (MLflow's limit)


@dataclass
class ImageItem:
    """A sample grid waiting to be logged as `key` at `step` (MLflow's image slider)."""

    run_id: str
    key: str
    step: int
    path: Path


@dataclass
class ArtifactItem:
    """A file waiting to be logged under `artifact_path`."""

    run_id: str
    path: Path
    artifact_path: str | None


class MetricLogger:
    """Queue + sender thread for one phase's rank 0. Every public method returns at once.

    `runs` maps a role to a run id: metrics go to every run in `to` (default: all), so the
    parent run gets one curve over the whole run and the phase run its own part of it.
    """

    def __init__(self, uri: str, runs: dict[str, str], retry_s: float = 2.0) -> None:
        self.uri, self.runs, self.retry_s = uri, dict(runs), retry_s
        self.client = MlflowClient(tracking_uri=with_credentials(uri))
        self.metrics: deque[tuple[str, Metric]] = deque()
        self.items: deque[ImageItem | ArtifactItem] = deque()
        self.spill = Path(tempfile.mkdtemp(prefix="progan-mlflow-spill-"))
        self.failures = 0
        self.first_error: str | None = None
        self.skip_through = -1  # steps already in MLflow (a restarted worker repeats them)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._sender.start()

    def skip_logged(self, key: str, after: int, role: str = "phase") -> int:
        """After a restart from `after` images: skip steps the run already has for `key`
        (the restarted worker repeats them exactly). Returns the last logged step."""
        try:
            with fail_fast_http():
                history = self.client.get_metric_history(self.runs[role], key)
        except Exception as err:  # unknown: log everything again (the restart is tagged)
            log.warning("could not read %s's history from MLflow: %s", key, err)
            return after
        self.skip_through = max([m.step for m in history if m.step > after], default=after)
        return self.skip_through

    def log(self, metrics: dict[str, float], step: int, to: tuple[str, ...] | None = None) -> None:
        """Queue `metrics` at `step` for the runs named in `to` (all by default)."""
        if step <= self.skip_through:
            return
        now = int(time.time() * 1000)
        with self._lock:
            for role in to or tuple(self.runs):
                run_id = self.runs[role]
                self.metrics.extend(
                    (run_id, Metric(k, float(v), now, int(step))) for k, v in metrics.items()
                )
        self._wake.set()

    def log_image(self, image_file: str | Path, key: str, step: int, role: str) -> None:
        """Queue a PNG as `key` at `step` (copied to the spill folder first)."""
        if step <= self.skip_through:
            return
        spilled = self.spill / f"{key}-{role}-{step:012d}.png"
        shutil.copyfile(image_file, spilled)
        self._enqueue(ImageItem(self.runs[role], key, int(step), spilled))

    def log_artifact(self, path: str | Path, artifact_path: str | None, role: str) -> None:
        """Queue a file as an artifact (copied to the spill folder first)."""
        folder = self.spill / f"artifact-{len(self.items)}-{time.monotonic_ns()}"
        folder.mkdir()
        spilled = folder / Path(path).name
        shutil.copyfile(path, spilled)
        self._enqueue(ArtifactItem(self.runs[role], spilled, artifact_path))

    def _enqueue(self, item: ImageItem | ArtifactItem) -> None:
        with self._lock:
            self.items.append(item)
        self._wake.set()

    def wait_sent(self, timeout_s: float) -> bool:
        """Wake the sender and wait until everything queued is delivered (at most
        `timeout_s`); False if some is still queued (it stays queued)."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.pending()

    def pending(self) -> int:
        """Metric values and files not delivered yet."""
        with self._lock:
            return len(self.metrics) + len(self.items)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.retry_s)
            self._wake.clear()
            if not self._stop.is_set() and not self.flush():
                self._stop.wait(self.retry_s)  # the server is away: back off, keep everything

    def flush(self) -> bool:
        """Send what is queued, in order; False (and keep the rest) on the first failure."""
        try:
            with fail_fast_http():
                while True:
                    batch = self._leading_batch()
                    if not batch:
                        break
                    self.client.log_batch(batch[0][0], metrics=[m for _, m in batch])
                    with self._lock:
                        for _ in batch:
                            self.metrics.popleft()
                while True:
                    with self._lock:
                        item = self.items[0] if self.items else None
                    if item is None:
                        break
                    self._send(item)
                    with self._lock:
                        self.items.popleft()
            return True
        except Exception as err:  # tracking must never stop training
            self.failures += 1
            if self.first_error is None:
                self.first_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                log.warning("MLflow logging failed (%s); queueing and retrying", err)
            return False

    def _leading_batch(self) -> list[tuple[str, Metric]]:
        """The oldest queued metrics of one run (at most BATCH): one call, all or nothing."""
        batch: list[tuple[str, Metric]] = []
        with self._lock:
            for run_id, metric in self.metrics:
                if len(batch) == BATCH or (batch and run_id != batch[0][0]):
                    break
                batch.append((run_id, metric))
        return batch

    def _send(self, item: ImageItem | ArtifactItem) -> None:
        if isinstance(item, ImageItem):
            from PIL import Image

            with Image.open(item.path) as image:
                self.client.log_image(
                    item.run_id, image.convert("RGB"), key=item.key, step=item.step
                )
        else:
            self.client.log_artifact(item.run_id, str(item.path), item.artifact_path)
        item.path.unlink(missing_ok=True)

    def close(self) -> dict[str, Any] | None:
        """Stop the sender, try once more. None if everything arrived, else what did not
        (metrics as dicts, grids as PNG bytes, lost files) and the first error."""
        self._stop.set()
        self._wake.set()
        self._sender.join()
        self.flush()
        try:
            if not (self.metrics or self.items):
                return None  # failures on the way were retried until everything arrived
            return {
                "error": self.first_error,
                "failures": self.failures,
                "unsent": [
                    {"run_id": r, "key": m.key, "value": m.value, "step": m.step}
                    for r, m in self.metrics
                ],
                "unsent_images": [
                    {"run_id": i.run_id, "key": i.key, "step": i.step, "png": i.path.read_bytes()}
                    for i in self.items
                    if isinstance(i, ImageItem)
                ],
                "lost_artifacts": [
                    f"{i.artifact_path or ''}/{i.path.name}"
                    for i in self.items
                    if isinstance(i, ArtifactItem)
                ],
            }
        finally:
            shutil.rmtree(self.spill, ignore_errors=True)
