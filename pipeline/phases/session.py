"""One phase's life, whoever hosts it: restore, train, checkpoint, evaluate, sample, export.

The three hosts (pipeline.phases.ray_train: a Ray Train worker per rank; .tune_trial: a Tune
trial's process; .local: `progan train-local`) build a `GANTrainer`, restore it
(`restore_trainer`) and run a `PhaseSession` for a `PhaseJob`. What differs between them is
only where things go, so each passes `PhaseSink`s: Ray Train reports and the driver's
mailbox, MLflow (pipeline.phases.mlflow_sink), Tune reports, a local folder.

At every checkpoint point (`run.checkpoint_every_kimg`, and the phase end) rank 0 writes one
checkpoint directory (pipeline.phases.checkpoints: state.pt, the sample grid, and at the end
generator.pt) and hands it to the sinks, which must keep what they need before returning.
Every rank calls the sinks' `checkpoint` at the same images shown (Ray's report is a
barrier); only rank 0 has a directory.

The end-of-phase evaluation (`eval.*`) runs after the final checkpoint is handed over, so
nothing it does can throw the phase's training away: an error in it is told to the sinks
(`evaluation_failed`) and the phase still ends. A session restored at its phase's end (a
kill during the evaluation) only evaluates.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.dataset import local_dataset
from pipeline.phases.checkpoints import (
    GENERATOR_FILE,
    HOST_KEY,
    STATE_FILE,
    checkpoint_name,
    export_generator,
    load_training_state,
    sample_grid_path,
)
from progan.checkpoint import save_checkpoint
from progan.loop import LoopOptions, run_phase
from progan.sampling import fixed_latents, generate, save_grid
from progan.schedule import Phase
from progan.trainer import GANTrainer

# The loop's stats that go to the trackers and the console (r1, augment_p and d_real_sign:
# only with train.r1_gamma / train.augment on).
LOGGED_STATS = (
    *("d_loss", "g_loss", "gp", "r1", "d_real", "d_fake", "d_real_sign", "augment_p"),
    *("alpha", "lr", "images_per_s"),
)


@dataclass(frozen=True)
class TrackingIds:
    """Where rank 0 logs a phase: the MLflow server, the run that holds one curve per metric
    over the whole run (a pipeline run's parent run, or a Tune trial's run), the phase's run."""

    uri: str
    run_id: str
    phase_run_id: str


@dataclass
class PhaseJob:
    """Everything a phase session needs, typed; built by the host's driver and, for Ray
    Train, sent to every worker as it is."""

    cfg: PipelineConfig
    phase_index: int
    init_checkpoint: str | None = None  # the previous phase's final checkpoint (a URI)
    # this phase's latest checkpoint when Ray's own record of it was unreadable (a URI)
    resume_checkpoint: str | None = None
    tracking: TrackingIds | None = None
    mailbox: Any = None  # pipeline.phases.mailbox handle (Ray Train only)
    evaluate: bool = True  # evaluate cfg.eval's metrics at the phase end
    hooks: dict[str, Any] = field(default_factory=dict)  # test-only fault injection

    @property
    def phase(self) -> Phase:
        return self.cfg.plan[self.phase_index]


class PhaseSink:
    """Where a session's events go. A host subclasses it and overrides what it needs; each
    method gets the session (its job, trainer, phase, origin and clocks)."""

    def started(self, session: PhaseSession) -> None:
        """Before the first step (the trainer is restored)."""

    def stats(self, session: PhaseSession, stats: dict[str, float]) -> None:
        """Every `run.log_every_kimg` and at the phase end: the loop's stats."""

    def step(self, session: PhaseSession) -> None:
        """After every step; it must not read device values (`session.request_stop`)."""

    def evaluated(self, session: PhaseSession, metrics: dict[str, float]) -> None:
        """Rank 0, after the final checkpoint (or where training stopped): eval.* metrics."""

    def evaluation_failed(self, session: PhaseSession, error: Exception) -> None:
        """Rank 0: the evaluation raised; the phase ends all the same."""

    def state_extras(self, session: PhaseSession) -> dict[str, Any]:
        """Rank 0: host bookkeeping (plain values) to save in state.pt under "host"."""
        return {}

    def sample_grid(self, session: PhaseSession, path: Path, images_shown: int) -> None:
        """Rank 0: the sample grid of this checkpoint (a file inside its directory)."""

    def exported(self, session: PhaseSession, path: Path) -> None:
        """Rank 0: generator.pt of this checkpoint (the phase end, or a stop)."""

    def checkpoint(
        self, session: PhaseSession, directory: Path | None, report: dict[str, Any]
    ) -> None:
        """Every rank at each checkpoint point; rank 0 gets the directory (deleted after
        this returns). `report`: images_shown, final, stopped, origin, train_seconds."""

    def finished(self, session: PhaseSession) -> None:
        """The phase trained to its end (or to a requested stop)."""

    def failed(self, session: PhaseSession, error: BaseException) -> None:
        """Training raised (a non-finite loss, an interrupt, a bug); it is re-raised."""


class StopRequested(Exception):
    """A sink asked the session to stop (a time budget); the session saves and ends."""


@dataclass
class PhaseOutcome:
    """How a session ended."""

    phase: Phase
    images_shown: int
    stopped: bool  # by a sink's request, before the phase's end
    evaluation: dict[str, float]
    train_seconds: float
    eval_seconds: float
    evaluation_error: str | None = None  # the evaluation raised this (the phase still ended)


def loop_options(cfg: PipelineConfig) -> LoopOptions:
    """The phase loop's cadence and data settings from the config (`run.*_kimg`,
    `data.loader_workers`, `data.preload_mb`)."""
    return LoopOptions(
        log_every_images=max(1, round(cfg.run.log_every_kimg * 1000)),
        checkpoint_every_images=max(1, round(cfg.run.checkpoint_every_kimg * 1000)),
        num_workers=cfg.data.loader_workers,
        preload_bytes=round(cfg.data.preload_mb * 2**20),
    )


@dataclass
class Restored:
    """Where a trainer was restored from, and the host bookkeeping saved with that state."""

    origin: str
    host: dict[str, Any]


def restore_trainer(trainer: GANTrainer, sources: Iterable[tuple[str, Any]]) -> Restored:
    """Load the first available of (origin, checkpoint) into the trainer; "scratch" if none.
    A checkpoint is anything `load_training_state` reads, or None (skipped)."""
    for origin, source in sources:
        if source is not None:
            state = load_training_state(source)
            trainer.load_state_dict(state)
            return Restored(origin, dict(state.get(HOST_KEY) or {}))
    return Restored("scratch", {})


class PhaseSession:
    """One phase of a job on one rank, from the trainer's position to the phase's end."""

    def __init__(
        self, job: PhaseJob, trainer: GANTrainer, sinks: Sequence[PhaseSink], origin: str
    ) -> None:
        self.job, self.cfg, self.phase = job, job.cfg, job.phase
        self.trainer, self.sinks, self.origin = trainer, list(sinks), origin
        self.writes = trainer.rank == 0  # rank 0 writes checkpoints and evaluates
        self.start_images = trainer.images_shown
        self.started = time.perf_counter()
        self.eval_seconds = 0.0
        self.evaluation: dict[str, float] = {}
        self.evaluation_error: str | None = None
        self._stop_reason: str | None = None
        overridden = [s for s in self.sinks if type(s).step is not PhaseSink.step]
        self._step_sinks = overridden

    # -- clocks and control -----------------------------------------------------------------
    @property
    def train_seconds(self) -> float:
        """Seconds of this session so far, evaluation left out."""
        return time.perf_counter() - self.started - self.eval_seconds

    def request_stop(self, reason: str) -> None:
        """Stop after this step: a checkpoint, the evaluation and generator.pt are made there
        (single-process hosts only: the ranks of a DDP job would not stop together)."""
        self._stop_reason = reason

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    # -- the phase ------------------------------------------------------------------------
    def run(self) -> PhaseOutcome:
        """Train to the phase's end (or a requested stop); see the module doc."""
        from preprocessing.lmdb_store import LmdbImageDataset

        phase, trainer = self.phase, self.trainer
        if trainer.images_shown < phase.start_images:
            raise RuntimeError(
                f"phase {phase.name} starts at {phase.start_images} images but the checkpoint "
                f"({self.origin}) is at {trainer.images_shown}"
            )
        self.started = time.perf_counter()
        self._each("started")
        at_end = trainer.images_shown >= phase.end_images  # restored from the final checkpoint
        stopped = False
        try:
            try:
                if not at_end:
                    dataset = LmdbImageDataset(self.dataset_folder, phase.resolution)
                    run_phase(
                        trainer,
                        dataset,
                        phase,
                        loop_options(self.cfg),
                        lambda stats: self._each("stats", stats),
                        lambda _trainer, _stats, final: self._checkpoint(final),
                        self._on_step if self._step_sinks else None,
                    )
            except StopRequested:
                trainer.read_stats()  # a NaN/inf loss since the last log raises here
                self._checkpoint(final=False, stopped=True)
                stopped = True
            if self.wants_evaluation:
                self.evaluate_safely()
        except BaseException as err:
            self._each("failed", err)
            raise
        self._each("finished")
        return PhaseOutcome(
            phase,
            trainer.images_shown,
            stopped,
            self.evaluation,
            self.train_seconds,
            self.eval_seconds,
            self.evaluation_error,
        )

    def _on_step(self, trainer: GANTrainer) -> None:
        for sink in self._step_sinks:
            sink.step(self)
        if self._stop_reason is not None:
            raise StopRequested(self._stop_reason)

    def _each(self, event: str, *args: Any) -> None:
        for sink in self.sinks:
            getattr(sink, event)(self, *args)

    def evaluate_safely(self) -> None:
        """`evaluate`, with an error told to the sinks instead of raised: the final
        checkpoint is already handed over, and a restart would only fail the same way."""
        try:
            self.evaluate()
        except Exception as err:
            self.evaluation_error = f"{type(err).__name__}: {err}"
            self._each("evaluation_failed", err)

    def evaluate(self) -> dict[str, float]:
        """cfg.eval's metrics of G_ema in this phase at the trainer's images shown (real
        statistics cached beside the dataset, or beside this node's staged copy of it);
        told to the sinks."""
        from pipeline.evaluation import evaluate_generator

        cfg, trainer, phase = self.cfg, self.trainer, self.phase
        started = time.perf_counter()
        results = evaluate_generator(
            trainer.G_ema,
            phase.level,
            phase.alpha_at(trainer.images_shown),
            self.dataset_folder,
            phase.resolution,
            metrics=tuple(cfg.eval.metrics),
            num_images=cfg.eval.num_images,
            fid_weights=cfg.eval.fid_weights,
            device=trainer.device,
            seed=cfg.train.seed,
        )
        self.eval_seconds += time.perf_counter() - started
        self.evaluation = {k: float(v) for k, v in results.items() if isinstance(v, int | float)}
        self._each("evaluated", self.evaluation)
        return self.evaluation

    @functools.cached_property
    def dataset_folder(self) -> str:
        """The dataset as a folder here: `data.dataset`, or (a URI) this node's staged copy of
        the phase's resolution, staged once for training and evaluation."""
        return local_dataset(self.cfg, [self.phase.resolution])

    @property
    def wants_evaluation(self) -> bool:
        cfg = self.cfg
        return self.writes and self.job.evaluate and cfg.eval.enabled and bool(cfg.eval.metrics)

    def _checkpoint(self, final: bool, stopped: bool = False) -> None:
        trainer, phase = self.trainer, self.phase
        shown = trainer.images_shown
        report: dict[str, Any] = {
            "images_shown": shown,
            "final": final,
            "stopped": stopped,
            "origin": self.origin,
            "train_seconds": self.train_seconds,
        }
        at_end = final or stopped
        with tempfile.TemporaryDirectory(prefix="progan-checkpoint-") as tmp:
            directory = None
            if self.writes:
                directory = Path(tmp) / checkpoint_name(shown)
                state = trainer.state_dict()
                extras: dict[str, Any] = {}
                for sink in self.sinks:
                    extras.update(sink.state_extras(self))
                save_checkpoint({**state, HOST_KEY: extras}, directory / STATE_FILE)
                latents = fixed_latents(
                    self.cfg.run.sample_grid, self.cfg.model.latent_size, self.cfg.train.seed
                )
                images = generate(trainer.G_ema, latents, phase.level, phase.alpha_at(shown))
                grid = save_grid(images, sample_grid_path(directory, shown))
                self._each("sample_grid", grid, shown)
                if at_end:
                    generator = export_generator(state, phase, directory / GENERATOR_FILE)
                    self._each("exported", generator)
            self._each("checkpoint", directory, report)
