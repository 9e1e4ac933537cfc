"""What workers tell the driver, through Ray rather than through files.

Ray Train hands the driver only the metrics of the last report that carried a checkpoint.
Whatever else the driver must know of a phase (where each worker start restored from,
MLflow logging that failed, metrics that never reached the server, a non-finite loss)
travels through one small actor that the driver creates per run and passes to every
phase's workers. Posting never raises: a driver that is gone must not stop training.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=0)
class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def post(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    def read(self, start: int = 0) -> list[dict[str, Any]]:
        return self.messages[start:]


class Mailbox:
    """Driver side: create, read new messages; workers call `post` on `handle`."""

    def __init__(self) -> None:
        self.handle = _Mailbox.remote()
        self.seen = 0

    def new_messages(self) -> list[dict[str, Any]]:
        """Messages posted since the last call."""
        messages = ray.get(self.handle.read.remote(self.seen), timeout=60)
        self.seen += len(messages)
        return messages

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
