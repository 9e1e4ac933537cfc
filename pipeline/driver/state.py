"""The run directory's `state.json` and its lock.

state.json says which phases are done, where their final checkpoints are in storage, where
each worker start restored from, and the MLflow ids. It is written atomically after every
change, so a driver killed at any moment leaves a state that a rerun (`progan run --run-id
ID` or `progan resume RUN_DIR`) can continue from. `RunLock` keeps a second driver off a
run that one is driving.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.tracking.secrets import redact_uri
from preprocessing.lmdb_store import write_json_atomic
from progan.files import FolderLock

LOCK_FILE = FolderLock.NAME


class RunLockedError(ConfigError):
    """Another process is driving this run."""


class RunLock(FolderLock):
    """An exclusive lock on a run directory, held while a driver runs it
    (progan.files.FolderLock: a killed run never leaves a stale lock behind)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir, RunLockedError)

    def message(self, holder: str) -> str:
        return (
            f"run {self.path.parent.name} is being run by {holder}; wait for it to end "
            "or stop it, then `progan resume` it"
        )


@dataclass
class PhaseState:
    """One phase's bookkeeping."""

    child_run_id: str | None = None
    ray_name: str | None = None
    done: bool = False
    checkpoint: str | None = None  # the final checkpoint's URI (or path) in storage
    evaluation: dict[str, float] = field(default_factory=dict)  # end-of-phase metrics
    evaluation_error: str | None = None  # the end-of-phase evaluation raised this
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
    storage_claim: str | None = None  # this run's token in its storage (driver.storage)
    dataset_fingerprint: str | None = None  # the manifest's, when the run started
    phases: dict[str, PhaseState] = field(default_factory=dict)

    def phase(self, index: int) -> PhaseState:
        return self.phases.setdefault(str(index), PhaseState())

    def in_order(self) -> list[PhaseState]:
        """The phases recorded so far, by index."""
        return [self.phases[k] for k in sorted(self.phases, key=int)]

    def final_metrics(self) -> dict[str, float]:
        """The latest value of each end-of-phase metric over the run."""
        metrics: dict[str, float] = {}
        for phase in self.in_order():
            metrics.update(phase.evaluation)
        return metrics

    @classmethod
    def load(cls, path: Path) -> RunState:
        raw = json.loads(path.read_text())
        phases = {k: PhaseState(**v) for k, v in raw.pop("phases", {}).items()}
        return cls(**raw, phases=phases)

    def save(self, path: Path) -> None:
        """Write atomically; a password inside a URI (storage, tracking) is not written."""
        write_json_atomic(path, json.loads(redact_uri(json.dumps(asdict(self)))), indent=2)
