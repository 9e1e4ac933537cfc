"""What workers tell the driver, through Ray rather than through files.

Ray Train hands the driver only the metrics of the last report that carried a checkpoint.
Whatever else the driver must know of a phase (where each worker start restored from,
MLflow logging that failed, metrics that never reached the server, a non-finite loss)
travels through one small actor that the driver creates per run and passes to every
phase's workers. Posting never raises: a driver that is gone must not stop training.
Progress (rank 0's stats at each log point, pipeline.progress) has its own channel, sent
without waiting for the actor, and the actor keeps only the latest `PROGRESS_KEPT` points.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

log = logging.getLogger(__name__)
PROGRESS_KEPT = 1000


@ray.remote(num_cpus=0, max_restarts=0)
class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.progress: list[dict[str, Any]] = []
        self.progress_dropped = 0  # points before the kept ones

    def post(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def read(self, start: int = 0) -> list[dict[str, Any]]:
        return self.messages[start:]

    def post_progress(self, point: dict[str, Any]) -> None:
        self.progress.append(point)
        if len(self.progress) > PROGRESS_KEPT:
            drop = len(self.progress) - PROGRESS_KEPT
            del self.progress[:drop]
            self.progress_dropped += drop

    def read_progress(self, start: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """(the index after the last point, the points from `start` still kept)."""
        first = max(0, start - self.progress_dropped)
        return self.progress_dropped + len(self.progress), self.progress[first:]


class Mailbox:
    """Driver side: create, read new messages; workers call `post` on `handle`."""

    def __init__(self) -> None:
        self.handle = _Mailbox.remote()
        self.seen = 0
        self.progress_seen = 0

    def new_messages(self) -> list[dict[str, Any]]:
        """Messages posted since the last call."""
        messages = ray.get(self.handle.read.remote(self.seen), timeout=60)
        self.seen += len(messages)
        return messages

    def new_progress(self, timeout_s: float = 30) -> list[dict[str, Any]]:
        """Progress points posted since the last call (the latest PROGRESS_KEPT at most)."""
        ref = self.handle.read_progress.remote(self.progress_seen)
        end, points = ray.get(ref, timeout=timeout_s)
        self.progress_seen = end
        return points

    def close(self) -> None:
        ray.kill(self.handle)


def post(handle: Any, kind: str, phase: int, **data: Any) -> None:
    """Worker side: send one message (best effort; waits at most 10 s)."""
    if handle is None:
        return
    message = {"kind": kind, "phase": phase, "time": time.time(), **data}
    try:
        ray.get(handle.post.remote(message), timeout=10)
    except Exception as err:  # the driver may be gone; training goes on
        log.warning("could not tell the driver (%s): %s", kind, err)


def post_progress(handle: Any, phase: int, **data: Any) -> None:
    """Worker side: send a progress point without waiting (adds no wait to the step)."""
    if handle is None:
        return
    try:
        handle.post_progress.remote({"phase": phase, "time": time.time(), **data})
    except Exception as err:  # the driver may be gone; training goes on
        log.debug("could not send progress: %s", err)
