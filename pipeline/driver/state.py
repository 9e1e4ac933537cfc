"""The run directory's `state.json` and its lock.

state.json says which phases are done, where their final checkpoints are in storage, where
each worker start restored from, and the MLflow ids. It is written atomically after every
change, so a driver killed at any moment leaves a state that a rerun (`progan run --run-id
ID` or `progan resume RUN_DIR`) can continue from. `RunLock` keeps a second driver off a
run that one is driving.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from preprocessing.lmdb_store import write_json_atomic

LOCK_FILE = ".lock"


class RunLockedError(ConfigError):
    """Another process is driving this run."""


class RunLock:
    """An exclusive lock on a run directory, held while a driver runs it.

    `flock` on `<run dir>/.lock`: released by the kernel when the process dies, however it
    dies, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"run {self.path.parent.name} is being run by {holder}; wait for it to end "
                "or stop it, then `progan resume` it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class PhaseState:
    """One phase's bookkeeping."""

    child_run_id: str | None = None
    ray_name: str | None = None
    done: bool = False
    checkpoint: str | None = None  # the final checkpoint's URI (or path) in storage
    evaluation: dict[str, float] = field(default_factory=dict)  # end-of-phase metrics
    # one entry per worker-group start: {"origin": scratch | previous-phase | ray-checkpoint,
    # "images": images shown restored}
    starts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunState:
    """All of a run's bookkeeping."""

    run_id: str
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    finished: bool = False
    phases: dict[str, PhaseState] = field(default_factory=dict)

    def phase(self, index: int) -> PhaseState:
        return self.phases.setdefault(str(index), PhaseState())

    @classmethod
    def load(cls, path: Path) -> RunState:
        raw = json.loads(path.read_text())
        phases = {k: PhaseState(**v) for k, v in raw.pop("phases", {}).items()}
        return cls(**raw, phases=phases)

    def save(self, path: Path) -> None:
        write_json_atomic(path, asdict(self), indent=2)
