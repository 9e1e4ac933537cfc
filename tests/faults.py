"""Faults injected into Ray Train workers by tests, never by the production worker.

Each function wraps `pipeline.phases.ray_train.phase_worker` and is passed to `run_pipeline(...,
worker_fn=...)`. The module is pickled by value, so a worker on another node (one that
cannot import `tests`) runs it too. Marker files live where the test says: shared storage
when the worker runs on another node.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import ray.cloudpickle
import torch

from pipeline.phases.ray_train import phase_worker

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def hooks(config: dict[str, Any]) -> dict[str, Any]:
    """The test's settings for this fault (`run_pipeline(test_hooks=...)`): the job's hooks."""
    return config["job"].hooks


def record_env(config: dict[str, Any]) -> None:
    """If the test asks (`env_file`), write this worker's MLFLOW_* variables there as JSON:
    what reached it through Ray's runtime env."""
    if "env_file" in hooks(config):
        import json

        env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
        Path(hooks(config)["env_file"]).write_text(json.dumps(env))


def dies_once(config: dict[str, Any]) -> None:
    """The last rank's process exits (as a crash would) once it has shown
    `fail_at_images` images; `fail_marker` records that it happened (see `crash_once_at`)."""
    crash_once_at(hooks(config)["fail_at_images"], Path(hooks(config)["fail_marker"]))
    record_env(config)
    phase_worker(config)


def dies_at(fail_at: int, marker: str):
    """`dies_once` with its settings given here (for tests.fault_cli, which has no hooks)."""

    def worker(config: dict[str, Any]) -> None:
        crash_once_at(fail_at, Path(marker))
        phase_worker(config)

    return worker


def crash_once_at(fail_at: int, marker: Path) -> None:
    """Make the last rank exit once it has shown `fail_at` images, unless `marker` exists
    (it is written first: on the worker's node, so a restarted worker there runs on).

    It waits a second first: Ray Train's controller takes a reported checkpoint into account
    when it next polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a crash
    right after a report may restart from the checkpoint before it. The wait makes the test
    see the checkpoint the report made, whatever the machine's load.
    """
    import progan.trainer

    step = progan.trainer.GANTrainer.step

    def train_step(self, reals):
        out = step(self, reals)
        last = self.rank == self.world_size - 1
        if last and self.images_shown >= fail_at and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(self.images_shown))
            time.sleep(1.0)
            os._exit(1)
        return out

    progan.trainer.GANTrainer.step = train_step


def record_start(config: dict[str, Any]) -> None:
    """Append a line to the test's `starts_file`: one per worker start."""
    with Path(hooks(config)["starts_file"]).open("a") as f:
        f.write("start\n")


def nan_on_last_rank(config: dict[str, Any]) -> None:
    """The last rank's real images (so its D loss) turn NaN from `nan_at_images` images on;
    each worker start appends a line to `starts_file`."""
    import progan.trainer

    record_start(config)
    nan_at = hooks(config)["nan_at_images"]
    prepare = progan.trainer.GANTrainer._prepare_real

    def _prepare_real(self, real, alpha, fading):
        out = prepare(self, real, alpha, fading)
        if self.rank == self.world_size - 1 and self.images_shown >= nan_at:
            out = out * float("nan")
        return out

    progan.trainer.GANTrainer._prepare_real = _prepare_real
    phase_worker(config)


def cannot_log(config: dict[str, Any]) -> None:
    """MLflow refuses every metric batch rank 0 sends (a server that is down)."""
    from mlflow.tracking import MlflowClient

    def log_batch(self, *args, **kwargs):
        raise ConnectionError("tracking server unreachable (injected)")

    MlflowClient.log_batch = log_batch
    phase_worker(config)


def batch_digest(batch: torch.Tensor) -> str:
    """sha1 of a batch's bytes: what `records_batches` writes, and what a test compares."""
    import hashlib

    return hashlib.sha1(batch.cpu().contiguous().numpy().tobytes()).hexdigest()


def records_batches(config: dict[str, Any]) -> None:
    """Each step appends `images_shown rank world_size batch_digest-of-its-real-images` to
    `batches_file` (what a rank really trained on)."""
    import progan.trainer

    step = progan.trainer.GANTrainer.step

    def recorded(self, reals):
        batch = reals if isinstance(reals, torch.Tensor) else reals[0]
        digest = batch_digest(batch)
        with Path(hooks(config)["batches_file"]).open("a") as f:
            f.write(f"{self.images_shown} {self.rank} {self.world_size} {digest}\n")
        return step(self, reals)

    progan.trainer.GANTrainer.step = recorded
    phase_worker(config)


# --- the CLI fault matrix (tests/fault_cli.py): a kill -9 of the whole run at a named point ---


def kill_run(driver_group: int) -> None:
    """kill -9 of the run's process group (the driver, its local Ray, its workers), as a
    machine that loses power would; this process too, in case it is outside that group."""
    import signal

    os.killpg(driver_group, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def recorded_checkpoints(snapshot_glob: str) -> list[str]:
    """The checkpoints Ray Train has recorded in the snapshot(s) matching the glob."""
    import glob
    import json

    for path in glob.glob(snapshot_glob):
        try:
            return [
                c["checkpoint_dir_name"]
                for c in json.loads(Path(path).read_text())["checkpoint_results"]
            ]
        except (ValueError, KeyError, OSError):  # being written
            return []
    return []


def progan_command(*args: str, fault: tuple[str, ...] = ()) -> list[str]:
    """`progan ARGS` (the console script), or with a fault installed: `python -m
    tests.fault_cli FAULT -- ARGS`."""
    if fault:
        return [sys.executable, "-m", "tests.fault_cli", *fault, "--", *args]
    return [str(Path(sys.executable).parent / "progan"), *args]


def worker_fault(kind: str, at: int, driver_group: int, recorded: str | None = None):
    """A `phase_worker` that kills the run at a point: "mid-step" (after the step that
    reaches `at` images), "checkpoint-write" (half-way through writing the state.pt of the
    checkpoint at `at` images), "evaluation" (in phase `at`'s end-of-phase evaluation).

    Ray records a reported checkpoint at its controller's next poll; a kill before that
    leaves the run to restart from the one before (correct, but not the case under test).
    Given the glob `recorded` of the phase's Ray snapshot, "mid-step" waits until some
    checkpoint is recorded and "evaluation" until the phase's final one is."""

    def wait_recorded(name: str | None) -> None:
        deadline = time.time() + 120
        while recorded:
            listed = recorded_checkpoints(recorded)
            if (name in listed) if name else listed:
                return
            assert time.time() < deadline, f"{name or 'nothing'} recorded at {recorded}"
            time.sleep(0.05)

    def faulty_worker(config: dict[str, Any]) -> None:
        import pipeline.phases.session as session
        import progan.trainer
        from progan.files import atomic_file

        if kind == "mid-step":
            step = progan.trainer.GANTrainer.step

            def train_step(self, reals):
                out = step(self, reals)
                if self.images_shown == at:
                    wait_recorded(None)
                    kill_run(driver_group)
                return out

            progan.trainer.GANTrainer.step = train_step
        elif kind == "checkpoint-write":
            save = session.save_checkpoint

            def save_checkpoint(state, path):
                if state["images_shown"] == at:
                    with atomic_file(path) as f:
                        f.write(b"half a checkpoint")
                        kill_run(driver_group)
                return save(state, path)

            session.save_checkpoint = save_checkpoint
        elif kind == "evaluation":
            evaluate = session.PhaseSession.evaluate

            def evaluate_then_die(self):
                if self.phase.index == at:
                    from pipeline.phases.checkpoints import checkpoint_name

                    wait_recorded(checkpoint_name(self.phase.end_images))
                    kill_run(driver_group)
                return evaluate(self)

            session.PhaseSession.evaluate = evaluate_then_die
        else:
            raise ValueError(kind)
        phase_worker(config)

    return faulty_worker


def worker_raises(config: dict[str, Any]) -> None:
    """Every worker start fails (a bug, a bad node): Ray Train gives up after max_failures."""
    raise RuntimeError("injected worker failure")


def evaluation_raises(config: dict[str, Any]) -> None:
    """The end-of-phase evaluation raises (a corrupt metrics cache, out of memory...)."""
    import pipeline.phases.session as session

    def evaluate(self):
        raise RuntimeError("metrics cache is corrupt (injected)")

    session.PhaseSession.evaluate = evaluate
    phase_worker(config)


def diverges_at_the_end(config: dict[str, Any]) -> None:
    """The last rank's G_ema drifts just before the phase's final checkpoint (a silent DDP
    bug); each worker start appends a line to `starts_file`."""
    import pipeline.phases.session as session

    record_start(config)
    checkpoint = session.PhaseSession._checkpoint

    def drifting(self, final, stopped=False):
        trainer = self.trainer
        if final and trainer.rank == trainer.world_size - 1:
            with torch.no_grad():
                next(trainer.G_ema.parameters()).add_(1e-3)
        return checkpoint(self, final, stopped)

    session.PhaseSession._checkpoint = drifting
    phase_worker(config)
