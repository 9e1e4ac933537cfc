"""What one Tune trial runs: all of its phases, reported to Tune in kimg.

A single-worker trial (the usual case for a search: one GPU, or one CPU here) trains every
phase in the trial's own process, with the same loop (`progan.loop.run_phase`), trainer and
end-of-phase evaluation as `progan run`, and no Ray Train job per phase: on the 2-core box a
phase's TorchTrainer costs 10-25 s, more than a demo phase trains (docs/tune.md). Every
checkpoint is a Tune checkpoint (`ray.tune.report(..., checkpoint=...)`), so a resumed sweep
(`Tuner.restore`) continues an unfinished trial from its latest one, mid-phase, and PBT can
hand one trial's state to another (the checkpoint's `trial.json` says whose it was).

A multi-worker trial runs `run_pipeline` (one TorchTrainer per phase, DDP) and reports at
each phase end; it resumes through its run directory, as `progan resume` does.

MLflow: one run per trial nested under the sweep run (tag `tune.trial_id`) with the trial's
config as params and each phase's metrics, and one child run per phase with the loss
curves and sample grids. PBT's exploits show as `pbt.*` tags and `hp.*` metrics.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from pipeline.common import evaluate_trainer, export_state, loop_options
from pipeline.config import PipelineConfig, merge, validate_config
from pipeline.metric_logger import MetricLogger
from pipeline.storage import STATE_FILE
from pipeline.tracking import Tracker, flatten
from pipeline.tune_space import nested
from pipeline.tune_spec import TIME_ATTR
from pipeline.worker import LOGGED_STATS, view_of
from preprocessing.lmdb_store import LmdbImageDataset
from progan.checkpoint import load_checkpoint, save_checkpoint
from progan.device import configure_device
from progan.loop import run_phase
from progan.sampling import fixed_latents, generate, save_grid
from progan.schedule import Phase
from progan.trainer import GANTrainer

META_FILE = "trial.json"  # in each Tune checkpoint: whose state it is, lineage, clocks


def trial_config(trial_raw: dict[str, Any], params: dict[str, Any]) -> PipelineConfig:
    """A raw config (the sweep's trial config, or the base for best.yaml) with the sampled
    values set, validated."""
    raw = trial_raw
    for key, value in params.items():
        raw = merge(raw, nested(key, value))
    return validate_config(raw)


def params_text(params: dict[str, Any]) -> str:
    """'key=value ...' sorted, floats to 4 significant digits."""
    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(params.items()))


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def find_trial_run(tracker: Tracker, sweep_name: str, trial_id: str) -> str | None:
    """The MLflow run of a trial of a sweep, if one was created."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`tune.sweep` = '{sweep_name}' and tags.`tune.trial_id` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune function trainable (see the module doc)."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(context["trial_raw"], params)
    if cfg.scaling.max_workers > 1:
        pipeline_trial(cfg, trial_id, params, context)
    else:
        InProcessTrial(cfg, trial_id, params, context).run()


def trial_tags(trial_id: str, params: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
    return {
        "tune.sweep": context["sweep_name"],
        "tune.trial_id": trial_id,
        "tune.params": params_text(params),
        "status": "running",
    }


def pipeline_trial(
    cfg: PipelineConfig, trial_id: str, params: dict[str, Any], context: dict[str, Any]
) -> None:
    """A multi-worker trial: `run_pipeline`, reporting each phase's metric."""
    import ray.tune

    from pipeline.run import run_pipeline

    def on_phase_end(phase: Phase, metrics: dict[str, float]) -> None:
        if context["metric"] in metrics:
            ray.tune.report(phase_result(phase, phase.end_images, final=True, **metrics))

    run_dir = Path(cfg.run.root) / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "trial.log").open("a") as log:
        run_pipeline(
            cfg,
            trial_id,
            console=Console(file=log, width=120, force_terminal=False),
            on_phase_end=on_phase_end,
            parent_run_id=context["sweep_run_id"],
            run_tags=trial_tags(trial_id, params, context),
            preflight=False,  # done once for the sweep
        )


def phase_result(phase: Phase, shown: int, final: bool, **metrics: float) -> dict[str, Any]:
    """What a trial reports to Tune: the clock (kimg), where it is, and the metrics."""
    return {
        TIME_ATTR: shown / 1000,
        "phases_done": phase.index + 1 if final else phase.index,
        "resolution": phase.resolution,
        **metrics,
    }


class InProcessTrial:
    """A single-worker trial: every phase in this process, checkpoints through Tune."""

    def __init__(
        self, cfg: PipelineConfig, trial_id: str, params: dict[str, Any], context: dict[str, Any]
    ) -> None:
        self.cfg, self.trial_id, self.params, self.ctx = cfg, trial_id, params, context
        device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")
        self.trainer = GANTrainer(cfg.gan, configure_device(device))
        self.plan = self.trainer.plan
        self.latents = fixed_latents(cfg.run.sample_grid, cfg.model.latent_size, cfg.train.seed)
        self.meta: dict[str, Any] = {
            "trial_id": trial_id,
            "lineage": [],
            "train_seconds": 0.0,
            "eval_seconds": 0.0,
        }
        self.uri = cfg.tracking.uri or context["tracking_uri"]
        self.tracker = Tracker(self.uri, cfg.tracking.experiment, context["artifact_root"])
        exploited = self.restore()
        self.start_kimg = self.trainer.images_shown / 1000  # where this process started
        self.run_id = self.open_trial_run(exploited)

    def restore(self) -> dict[str, Any] | None:
        """Load the trial's latest Tune checkpoint, if any; the exploit if it is another's."""
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            self.trainer.load_state_dict(load_checkpoint(Path(d) / STATE_FILE))
            saved = json.loads((Path(d) / META_FILE).read_text())
        self.meta.update({k: v for k, v in saved.items() if k != "trial_id"})
        if saved["trial_id"] == self.trial_id:
            return None
        exploit = {"from": saved["trial_id"], TIME_ATTR: self.trainer.images_shown / 1000}
        self.meta["lineage"] = [*saved["lineage"], {**exploit, "params": self.params}]
        return exploit

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
            lineage = " -> ".join(f"{e['from']}@{e[TIME_ATTR]:g}kimg" for e in self.meta["lineage"])
            tags |= {
                "pbt.exploited_from": exploited["from"],
                "pbt.exploit_kimg": f"{exploited[TIME_ATTR]:g}",
                "pbt.exploits": str(len(self.meta["lineage"])),
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
        for phase in self.plan:
            if self.trainer.images_shown < phase.end_images:
                self.train(phase)
        with tempfile.TemporaryDirectory() as tmp:
            state = self.trainer.state_dict()
            last = self.plan[-1]
            state.update(phase_index=last.index, phase_name=last.name, resolution=last.resolution)
            state["alpha"] = 1.0
            path = export_state(state, Path(tmp) / "generator.pt")
            self.tracker.log_artifact(self.run_id, path)
        self.tracker.client.set_tag(self.run_id, "status", "completed")
        self.tracker.finish(self.run_id)

    def train(self, phase: Phase) -> None:
        """Train `phase` to its end: losses to its MLflow run, each checkpoint to Tune."""
        cfg, trainer = self.cfg, self.trainer
        child = self.phase_run(phase)
        logger = MetricLogger(self.uri, {"phase": child, "run": self.run_id})
        if trainer.images_shown > phase.start_images:  # a restart: those steps are logged
            logger.skip_logged("d_loss", trainer.images_shown)
        clock = [time.perf_counter()]

        def on_stats(stats: dict[str, float]) -> None:
            logged = {k: v for k, v in stats.items() if k in LOGGED_STATS}
            logger.log({**logged, "resolution": phase.resolution}, stats["images_shown"])

        def on_checkpoint(trainer: GANTrainer, stats: dict[str, float], final: bool) -> None:
            self.meta["train_seconds"] += time.perf_counter() - clock[0]
            metrics = self.evaluate(phase, logger) if final else {}
            self.report(phase, final, metrics, logger)
            clock[0] = time.perf_counter()

        options = loop_options(cfg)
        dataset = LmdbImageDataset(cfg.data.dataset, phase.resolution)
        run_phase(trainer, dataset, phase, options, on_stats, on_checkpoint)
        lost = logger.close()
        if lost:
            self.tracker.client.set_tag(child, "tracking.incomplete", str(lost.get("error")))
        self.tracker.finish(child)

    def evaluate(self, phase: Phase, logger: MetricLogger) -> dict[str, float]:
        """End-of-phase metrics, to the phase run and the trial run."""
        cfg = self.cfg
        if not (cfg.eval.enabled and cfg.eval.metrics):
            return {}
        started = time.perf_counter()
        metrics = evaluate_trainer(cfg, self.trainer, phase, None)
        self.meta["eval_seconds"] += time.perf_counter() - started
        logger.log(metrics, phase.end_images)  # the phase run and the trial run
        return metrics

    def report(
        self, phase: Phase, final: bool, metrics: dict[str, float], logger: MetricLogger
    ) -> None:
        """A Tune result + checkpoint (state, whose it is) and a sample grid to MLflow."""
        import ray.tune

        trainer, shown = self.trainer, self.trainer.images_shown
        result = phase_result(phase, shown, final, **metrics)
        result |= {k: round(self.meta[k], 3) for k in ("train_seconds", "eval_seconds")}
        result["pbt_exploits"] = len(self.meta["lineage"])
        result["start_kimg"] = self.start_kimg
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(trainer.state_dict(), Path(tmp) / STATE_FILE)
            (Path(tmp) / META_FILE).write_text(json.dumps(self.meta, default=str))
            with tempfile.TemporaryDirectory() as grids:
                level, alpha = view_of(trainer, phase, final)
                grid = save_grid(
                    generate(trainer.G_ema, self.latents, level, alpha),
                    Path(grids) / f"{shown:09d}.png",
                )
                logger.log_image(grid, "samples", shown, role="run")  # the image slider
            ray.tune.report(result, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
