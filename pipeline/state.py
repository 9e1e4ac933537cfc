"""The run directory's `state.json`: which phases are done, their checkpoints, MLflow ids.

Written atomically after every change, so a driver killed at any moment leaves a state
that a rerun (`progan run --run-id ID` or `progan resume RUN_DIR`) can continue from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from preprocessing.lmdb_store import write_json_atomic


@dataclass
class PhaseState:
    """One phase's bookkeeping."""

    child_run_id: str | None = None
    ray_name: str | None = None
    done: bool = False
    checkpoint: str | None = None
    evaluation: dict[str, float] = field(default_factory=dict)  # end-of-phase metrics


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
