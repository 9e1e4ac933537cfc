"""What one Tune trial runs: its config from the sampled values, then its phases.

A single-worker trial (the usual case for a search: one GPU, or one CPU here) trains in its
own process (pipeline.phases.tune_trial). A multi-worker trial runs the Ray Train pipeline
(`run_pipeline`, one TorchTrainer per phase, DDP) and reports at each phase end; it resumes
through its run directory, as `progan resume` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline.config import PipelineConfig, merge, nested, validate_config
from pipeline.phases.tune_trial import InProcessTrial, phase_result, trial_tags
from progan.schedule import Phase


def trial_config(trial_raw: dict[str, Any], params: dict[str, Any]) -> PipelineConfig:
    """A raw config (the sweep's trial config, or the base for best.yaml) with the sampled
    values set, validated."""
    raw = trial_raw
    for key, value in params.items():
        raw = merge(raw, nested(key, value))
    return validate_config(raw)


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune function trainable (see the module doc)."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(context["trial_raw"], params)
    if cfg.scaling.max_workers > 1:
        pipeline_trial(cfg, trial_id, params, context)
    else:
        InProcessTrial(cfg, trial_id, params, context).run()


def pipeline_trial(
    cfg: PipelineConfig, trial_id: str, params: dict[str, Any], context: dict[str, Any]
) -> None:
    """A multi-worker trial: `run_pipeline`, reporting each phase's metric."""
    import ray.tune

    from pipeline.driver.run import run_pipeline

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
