"""The Tune host: a single-worker trial trains every phase in the trial's own process.

Each phase is a `PhaseSession` (pipeline.phases.session) with two sinks: `TuneSink`, which
reports every checkpoint to Tune (`ray.tune.report(..., checkpoint=...)`, the clock in kimg),
and the MLflow sink of the Ray host. No Ray Train job per phase: on the 2-core box a phase's
TorchTrainer costs 10-25 s, more than a demo phase trains (docs/tune.md). A resumed sweep
(`Tuner.restore`) continues an unfinished trial from its latest checkpoint, mid-phase, and
PBT can hand one trial's state to another: the trial's bookkeeping (whose state it is, the
exploit lineage, its clocks) is saved in state.pt under "host".

MLflow: one run per trial nested under the sweep run (tag `tune.trial_id`) with the trial's
config as params and each phase's metrics, and one child run per phase with the loss
curves and sample grids. PBT's exploits show as `pbt.*` tags and `hp.*` metrics. A
multi-worker trial runs the Ray Train pipeline instead (pipeline.search.trial).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import PipelineConfig
from pipeline.phases.checkpoints import GENERATOR_FILE, export_generator
from pipeline.phases.mlflow_sink import MlflowPhaseSink
from pipeline.phases.session import (
    PhaseJob,
    PhaseSession,
    PhaseSink,
    TrackingIds,
    restore_trainer,
)
from pipeline.tracking.secrets import with_credentials
from pipeline.tracking.tracker import Tracker, flatten
from progan.device import configure_device
from progan.schedule import Phase
from progan.trainer import GANTrainer

TIME_ATTR = "kimg"  # Tune's clock: thousands of images shown
CLOCKS = ("train_seconds", "eval_seconds")


def fmt(value: Any) -> str:
    """A value for display: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def params_text(params: dict[str, Any]) -> str:
    """'key=value ...' sorted, floats to 4 significant digits."""
    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(params.items()))


def find_trial_run(tracker: Tracker, sweep_name: str, trial_id: str) -> str | None:
    """The MLflow run of a trial of a sweep, if one was created."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`tune.sweep` = '{sweep_name}' and tags.`tune.trial_id` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def trial_tags(trial_id: str, params: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
    """The tags of a trial's MLflow run."""
    return {
        "tune.sweep": context["sweep_name"],
        "tune.trial_id": trial_id,
        "tune.params": params_text(params),
        "status": "running",
    }


def phase_result(phase: Phase, shown: int, final: bool, **metrics: float) -> dict[str, Any]:
    """What a trial reports to Tune: the clock (kimg), where it is, and the metrics."""
    return {
        TIME_ATTR: shown / 1000,
        "phases_done": phase.index + 1 if final else phase.index,
        "resolution": phase.resolution,
        **metrics,
    }


class TuneSink(PhaseSink):
    """A trial's side of a session: each checkpoint is a Tune result + Tune checkpoint."""

    def __init__(self, book: dict[str, Any], start_kimg: float) -> None:
        self.book, self.start_kimg = book, start_kimg

    def _clocks(self, session: PhaseSession) -> dict[str, float]:
        """The trial's clocks with this session's time added."""
        return {
            "train_seconds": self.book["train_seconds"] + session.train_seconds,
            "eval_seconds": self.book["eval_seconds"] + session.eval_seconds,
        }

    def state_extras(self, session: PhaseSession) -> dict[str, Any]:
        return {"trial": {**self.book, **self._clocks(session)}}

    def _result(self, session: PhaseSession, **metrics: Any) -> dict[str, Any]:
        """A Tune result at the trainer's images shown, with the trial's clocks."""
        shown = session.trainer.images_shown
        result = phase_result(session.phase, shown, shown >= session.phase.end_images, **metrics)
        result |= {k: round(v, 3) for k, v in self._clocks(session).items()}
        result["pbt_exploits"] = len(self.book["lineage"])
        result["start_kimg"] = self.start_kimg
        return result

    def checkpoint(
        self, session: PhaseSession, directory: Path | None, report: dict[str, Any]
    ) -> None:
        import ray.tune

        assert directory is not None  # one process: rank 0
        checkpoint = ray.tune.Checkpoint.from_directory(directory)
        ray.tune.report(self._result(session), checkpoint=checkpoint)

    def evaluated(self, session: PhaseSession, metrics: dict[str, float]) -> None:
        """The metrics as a second result at the same clock, without a checkpoint: the
        schedulers decide on it (a result without the metric leaves them undecided)."""
        import ray.tune

        ray.tune.report(self._result(session, **metrics))

    def evaluation_failed(self, session: PhaseSession, error: Exception) -> None:
        import ray.tune

        ray.tune.report(self._result(session, eval_error=session.evaluation_error))

    def finished(self, session: PhaseSession) -> None:
        self.book.update(self._clocks(session))

    def failed(self, session: PhaseSession, error: BaseException) -> None:
        self.book.update(self._clocks(session))


class InProcessTrial:
    """A single-worker trial: every phase in this process, checkpoints through Tune."""

    def __init__(
        self, cfg: PipelineConfig, trial_id: str, params: dict[str, Any], context: dict[str, Any]
    ) -> None:
        import ray.tune

        self.cfg, self.trial_id, self.params, self.ctx = cfg, trial_id, params, context
        device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
        self.trainer = GANTrainer(cfg.gan, configure_device(device), plan=cfg.plan)
        restored = restore_trainer(self.trainer, [("tune-checkpoint", ray.tune.get_checkpoint())])
        self.origin = restored.origin
        saved = restored.host.get("trial")
        self.book: dict[str, Any] = {
            "trial_id": trial_id,
            "lineage": list(saved["lineage"]) if saved else [],
            **{k: float(saved[k]) if saved else 0.0 for k in CLOCKS},
        }
        exploited = None
        if saved and saved["trial_id"] != trial_id:  # PBT copied another trial's state
            exploited = {"from": saved["trial_id"], TIME_ATTR: self.trainer.images_shown / 1000}
            self.book["lineage"].append({**exploited, "params": params})
        self.uri = with_credentials(cfg.tracking.uri or context["tracking_uri"])
        self.tracker = Tracker(self.uri, cfg.tracking.experiment, context["artifact_root"])
        self.sink = TuneSink(self.book, self.trainer.images_shown / 1000)
        self.run_id = self.open_trial_run(exploited)

    def open_trial_run(self, exploited: dict[str, Any] | None) -> str:
        """The trial's MLflow run (created once); PBT's exploits as tags and hp.* metrics."""
        tracker, ctx = self.tracker, self.ctx
        run_id = find_trial_run(tracker, ctx["sweep_name"], self.trial_id)
        tags = trial_tags(self.trial_id, self.params, ctx)
        if run_id is None:
            run_id = tracker.start_run(self.trial_id, tags, parent_id=ctx["sweep_run_id"])
            tracker.log_params(run_id, flatten(self.cfg.model_dump(mode="json")))
        else:
            tracker.reopen(run_id)
        if exploited:
            lineage = " -> ".join(f"{e['from']}@{e[TIME_ATTR]:g}kimg" for e in self.book["lineage"])
            tags |= {
                "pbt.exploited_from": exploited["from"],
                "pbt.exploit_kimg": f"{exploited[TIME_ATTR]:g}",
                "pbt.exploits": str(len(self.book["lineage"])),
                "pbt.lineage": lineage,
            }
        for key, value in tags.items():
            tracker.client.set_tag(run_id, key, value)
        numeric = {
            f"hp.{k}": float(v) for k, v in self.params.items() if isinstance(v, int | float)
        }
        if numeric:
            tracker.log_metrics(run_id, numeric, self.trainer.images_shown)
        return run_id

    def phase_run(self, phase: Phase) -> str:
        """This phase's child run (reopened after a restart)."""
        runs = self.tracker.client.search_runs(
            [self.tracker.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.run_id}' and tags.phase_index = '{phase.index}'",
            max_results=1,
        )
        if runs:
            self.tracker.reopen(runs[0].info.run_id)
            return runs[0].info.run_id
        tags = {
            "resolution": str(phase.resolution),
            "phase_kind": phase.kind,
            "phase_index": str(phase.index),
            "images": str(phase.num_images),
        }
        return self.tracker.start_run(phase.name, tags, parent_id=self.run_id)

    def run(self) -> None:
        """Every phase not done yet, then the generator and the final tags."""
        for phase in self.cfg.plan:
            if self.trainer.images_shown < phase.end_images:
                self.train(phase)
        with tempfile.TemporaryDirectory() as tmp:
            last = self.cfg.plan[-1]
            path = export_generator(self.trainer.state_dict(), last, Path(tmp) / GENERATOR_FILE)
            self.tracker.log_artifact(self.run_id, path)
        self.tracker.client.set_tag(self.run_id, "status", "completed")
        self.tracker.finish(self.run_id)

    def train(self, phase: Phase) -> None:
        """Train `phase` to its end: losses to its MLflow run, each checkpoint to Tune."""
        child = self.phase_run(phase)
        ids = TrackingIds(self.uri, self.run_id, child)

        def undelivered(what: dict[str, Any]) -> None:
            self.tracker.client.set_tag(child, "tracking.incomplete", str(what.get("error")))

        # MLflow first: its metrics are delivered before the report a scheduler may stop on
        sinks = [MlflowPhaseSink(ids, on_undelivered=undelivered), self.sink]
        job = PhaseJob(self.cfg, phase.index, tracking=ids)
        outcome = PhaseSession(job, self.trainer, sinks, self.origin).run()
        if outcome.evaluation_error:
            self.tracker.client.set_tag(child, "eval.error", outcome.evaluation_error)
        self.origin = "previous-phase"
        self.tracker.finish(child)
