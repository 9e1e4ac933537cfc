"""`make demo`'s path at a tiny size, run once per test session and shared.

`progan run conf/demo.yaml` with the built-in sample faces (MTCNN -> LMDBs -> 4x4 and 8x8
phases on a local Ray, tracked in runs/mlflow.db), as a subprocess from a directory of its
own. The CLI test checks what it made on disk; tests/test_mlflow_review.py checks what it
left in MLflow (curves, sample grids, dataset, system metrics, the registered model) and
what a browser shows of it.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT

PROGAN = str(Path(sys.executable).parent / "progan")
TINY = [
    "model.resolution=8",
    "model.latent_size=16",
    "model.fmap_base=64",
    "model.fmap_max=16",
    "schedule.transition_kimg=0.032",
    "schedule.stabilize_kimg=0.032",
    "schedule.total_kimg=null",
    "schedule.batch_base=8",
    "run.checkpoint_every_kimg=0.032",
    "run.log_every_kimg=0.016",
    "run.sample_grid=4",
    "scaling.cpus_per_worker=1",
    "eval.enabled=false",
]
# what the MLflow review needs on top: SWD at each 8x8 phase end, system metrics sampled
# often enough to be seen in phases of a few seconds
REVIEWABLE = [
    "eval.enabled=true",
    "eval.metrics=[swd]",
    "eval.num_images=16",
    "tracking.system_metrics_interval_s=0.5",
]


def progan(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`progan ARGS` as a user types it; its output is printed for the test log."""
    out = subprocess.run(
        [PROGAN, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    print(out.stdout[-4000:], out.stderr[-4000:])
    return out


@dataclass(frozen=True)
class DemoRun:
    """Where the shared demo run is and what `progan run` printed."""

    cwd: Path
    run_dir: Path
    tracking_uri: str
    out: subprocess.CompletedProcess


def run_tiny_demo(cwd: Path) -> DemoRun:
    """`progan run conf/demo.yaml` with 12 built-in faces at 4x4..8x8, run id `demo`."""
    demo = REPO_ROOT / "conf" / "demo.yaml"
    out = progan(
        "run", demo, *TINY, *REVIEWABLE, "data.sample_faces=12", "--run-id", "demo", cwd=cwd
    )
    root = cwd / "runs"
    return DemoRun(cwd, root / "demo", f"sqlite:///{root / 'mlflow.db'}", out)
