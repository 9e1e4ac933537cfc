"""The driver's side of one phase: its MLflow child run, the Ray Train fit, what the
workers said, and the phase's record in state.json."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline.config import PipelineConfig
from pipeline.driver.run_dir import GENERATOR_FILE, STATE_FILE
from pipeline.driver.state import RunState
from pipeline.driver.storage import checkpoint_uri, fetch_file, recover_unreadable_snapshot
from pipeline.phases.checkpoints import GENERATOR_FILE as CHECKPOINT_GENERATOR
from pipeline.phases.checkpoints import STATE_FILE as CHECKPOINT_STATE
from pipeline.phases.mailbox import Mailbox
from pipeline.phases.ray_train import WorkerFn, fit_phase
from pipeline.phases.session import PhaseJob, TrackingIds
from pipeline.progress import REFRESH_S, ProgressDisplay
from pipeline.tracking.secrets import redact_uri
from pipeline.tracking.tracker import Tracker
from preprocessing.object_store import join
from progan.schedule import Phase


class PhaseFailedError(RuntimeError):
    """A phase ended in a way a restart cannot mend (e.g. a non-finite loss)."""


class PhaseDriver:
    """The driver's side of one phase: MLflow child run, the fit, what workers said."""

    def __init__(
        self,
        cfg: PipelineConfig,
        run_dir: Path,
        state: RunState,
        tracker: Tracker,
        mailbox: Mailbox,
        console: Console,
        display: ProgressDisplay | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.state = cfg, run_dir, state
        self.tracker, self.mailbox, self.console = tracker, mailbox, console
        self.display = display

    def train(
        self,
        job: PhaseJob,
        storage: str,
        env: dict[str, str],
        worker_fn: WorkerFn | None,
    ) -> dict[str, Any]:
        """Fit the job's phase, record its final checkpoint and metrics, copy its
        generator.pt into the run directory; returns its table row."""
        state, tracker, console, phase = self.state, self.tracker, self.console, job.phase
        ps = state.phase(phase.index)
        ps.ray_name = ps.ray_name or f"{state.run_id}-{phase.name}"
        if ps.child_run_id is None:
            tags = {
                "resolution": str(phase.resolution),
                "phase_kind": phase.kind,
                "phase_index": str(phase.index),
                "images": str(phase.num_images),
                "ray_run_name": ps.ray_name,
            }
            ps.child_run_id = tracker.start_run(phase.name, tags, parent_id=state.parent_run_id)
            tracker.log_dataset(ps.child_run_id, self.cfg.data.dataset)
        else:
            tracker.reopen(ps.child_run_id)
        state.save(self.run_dir / STATE_FILE)
        console.print(f"phase {phase.name}: {phase.num_images} images, batch {phase.batch_size}")
        assert state.parent_run_id is not None
        # the URI without its password (a worker's environment has it: tracking.secrets)
        job.tracking = TrackingIds(redact_uri(tracker.uri), state.parent_run_id, ps.child_run_id)
        job.mailbox = self.mailbox.handle
        self.recover_snapshot(job, storage, ps.ray_name)
        started = time.perf_counter()
        try:
            with ProgressFeed(self.mailbox, self.display, phase.index):
                result = fit_phase(job, storage, ps.ray_name, env, worker_fn)
        finally:
            self.read_mailbox(phase)
        wall = time.perf_counter() - started
        if not result.metrics or not result.metrics.get("final"):
            raise PhaseFailedError(
                f"phase {phase.name} ended without its final checkpoint (last report: "
                f"{result.metrics}); `progan resume` continues from the latest one"
            )
        ps.checkpoint = checkpoint_uri(storage, ps.ray_name, result.checkpoint.path)
        fetch_file(join(ps.checkpoint, CHECKPOINT_GENERATOR), self.run_dir / GENERATOR_FILE)
        overhead = wall - float(result.metrics.get("train_seconds", wall))
        tracker.log_metrics(
            ps.child_run_id, {"phase_wall_s": wall, "ray_overhead_s": overhead}, phase.end_images
        )
        evaluation = ps.evaluation  # from the mailbox: it ran after the final report
        if self.display is not None:
            self.display.evaluated(phase.index, evaluation)
        if evaluation:  # the parent run gets each phase's numbers too: one curve per metric
            tracker.log_metrics(state.parent_run_id, evaluation, phase.end_images)
        if self.cfg.tracking.log_checkpoints:
            with result.checkpoint.as_directory() as d:
                tracker.log_artifact(ps.child_run_id, Path(d) / CHECKPOINT_STATE, "checkpoint")
        tracker.client.set_tag(ps.child_run_id, "checkpoint", redact_uri(ps.checkpoint))
        tracker.finish(ps.child_run_id)
        ps.done = True
        state.save(self.run_dir / STATE_FILE)
        note = f", SWD {evaluation['SWDx1e3_avg']:.1f}" if "SWDx1e3_avg" in evaluation else ""
        console.print(
            f"phase {phase.name}: done in {wall:.1f} s (Ray overhead {overhead:.1f} s){note}"
        )
        return {
            "phase": phase.name,
            "status": "trained",
            "wall_s": round(wall, 1),
            "ray_overhead_s": round(overhead, 1),
            **evaluation,
        }

    def recover_snapshot(self, job: PhaseJob, storage: str, ray_name: str) -> None:
        """Ray's record of the phase's checkpoints unreadable: continue from the newest
        checkpoint in storage that loads (pipeline.driver.storage), and say so."""
        recovered = recover_unreadable_snapshot(storage, ray_name)
        if recovered is None:
            return
        aside, checkpoint = recovered
        job.resume_checkpoint = checkpoint
        where = checkpoint.rsplit("/", 1)[-1] if checkpoint else "the phase's start"
        self.console.print(
            f"[yellow]phase {job.phase.name}: Ray's checkpoint list was unreadable (kept as "
            f"{redact_uri(aside)}); continuing from {where}[/]"
        )

    def read_mailbox(self, phase: Phase) -> None:
        """Record worker starts, show tracking trouble, fail on a non-finite loss."""
        ps = self.state.phase(phase.index)
        nonfinite = None
        for m in self.mailbox.new_messages():
            kind = m["kind"]
            if kind == "start":
                ps.starts.append({"origin": m["origin"], "images": m["images"]})
                if len(ps.starts) > 1:
                    self.console.print(
                        f"[yellow]phase {phase.name}: workers restarted from "
                        f"{m['origin']} at {m['images']} images[/]"
                    )
            elif kind == "tracking-failing":
                self.console.print(
                    f"[yellow]phase {phase.name}: rank 0 cannot log to MLflow ({m['error']}); "
                    "it keeps retrying[/]"
                )
            elif kind == "tracking":
                self.recover_tracking(phase, m)
            elif kind == "nonfinite":
                nonfinite = m["message"]
            elif kind == "evaluated":
                ps.evaluation = {k: float(v) for k, v in m["metrics"].items()}
                ps.evaluation_error = None
            elif kind == "evaluation-failed":
                self.evaluation_failed(phase, m["error"])
        self.state.save(self.run_dir / STATE_FILE)
        if ps.starts and ps.child_run_id:
            starts = ", ".join(f"{s['origin']}@{s['images']}" for s in ps.starts)
            self.safe(lambda: self.tracker.client.set_tag(ps.child_run_id, "starts", starts))
        if nonfinite:
            raise PhaseFailedError(f"phase {phase.name}: {nonfinite}")

    def evaluation_failed(self, phase: Phase, error: str) -> None:
        """The end-of-phase evaluation raised: the phase is trained all the same; the error
        goes on its run and the parent run as `eval.error`, and one line to the console."""
        ps = self.state.phase(phase.index)
        ps.evaluation, ps.evaluation_error = {}, error
        self.console.print(
            f"[yellow]phase {phase.name}: evaluation failed ({error[:300]}); the phase is "
            "trained, its metrics are missing (`progan evaluate` scores its generator)[/]"
        )
        for run in (ps.child_run_id, self.state.parent_run_id):
            if run:
                self.safe(lambda run=run: self.tracker.client.set_tag(run, "eval.error", error))

    def recover_tracking(self, phase: Phase, m: dict[str, Any]) -> None:
        """Rank 0 could not deliver everything: log it from here, else keep it beside the
        run (pipeline.tracking.tracker.Tracker.replay); either way say so and tag the phase."""
        ps = self.state.phase(phase.index)
        self.console.print(f"[yellow]phase {phase.name}: MLflow logging from rank 0 failed")
        tag = self.tracker.replay(m, self.run_dir / f"unlogged-{phase.name}")
        self.console.print(f"[yellow]  {tag}")
        self.safe(lambda: self.tracker.client.set_tag(ps.child_run_id, "tracking.incomplete", tag))

    def safe(self, action: Callable[[], Any]) -> bool:
        """Run a tracking call; False (and a console line) if MLflow refuses it."""
        try:
            action()
            return True
        except Exception as err:
            self.console.print(f"[yellow]MLflow: {type(err).__name__}: {str(err)[:200]}")
            return False


class ProgressFeed:
    """While a phase fits: read rank 0's progress points from the mailbox every REFRESH_S
    seconds into the display (pipeline.progress), in a thread of the driver."""

    def __init__(self, mailbox: Mailbox, display: ProgressDisplay | None, phase: int) -> None:
        self.mailbox, self.display, self.phase = mailbox, display, phase
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="progan-progress", daemon=True)

    def __enter__(self) -> ProgressFeed:
        if self.display is not None:
            self.display.phase_started(self.phase)
            self.thread.start()
        return self

    def loop(self) -> None:
        while not self.stop.wait(REFRESH_S):
            self.drain()

    def drain(self) -> None:
        display = self.display
        if display is None:
            return
        try:
            points = self.mailbox.new_progress(timeout_s=10)
        except Exception:  # the display is best effort; the phase goes on
            return
        for point in points:
            if point.get("phase") != self.phase:
                continue
            if point.get("state") == "evaluating":
                display.evaluating(self.phase)
            elif point.get("state") == "started":
                display.phase_started(self.phase, int(point["images_shown"]))
            else:
                display.point(self.phase, point)

    def __exit__(self, *exc: object) -> None:
        if self.display is None:
            return
        self.stop.set()
        self.thread.join(timeout=30)
        self.drain()
