"""Hyperparameter search: many short progressive trainings on Ray Tune, tracked in MLflow.

The spec (pipeline.search.spec) is validated before Ray starts. Each trial is a Tune
function trainable (pipeline.search.trial.run_trial) that trains all its phases and reports
each checkpoint with `kimg` (thousands of images shown) as the schedulers' clock, so ASHA's
grace period and max_t, and PBT's perturbation interval, are budgets in images.

Tune owns the bookkeeping: trial results and checkpoints (`<sweep>/ray/`), `Tuner.restore`
for `--resume` (finished trials stay finished, unfinished ones continue from their latest
checkpoint), the ResultGrid the summary is read from (pipeline.search.summary). ASHA's rungs
survive a resume through the scheduler's own `save`/`restore`.

Layout of a sweep directory (`<base run.root>/tune/<name>`):

    tune.yaml         the resolved spec (base config inlined), what `--resume` reads
    sweep.json        MLflow ids of the sweep run
    ray/              Tune's experiment: results, checkpoints, scheduler.pkl
    trials/           run directories of multi-worker trials (they run `run_pipeline`)
    summary.md/.csv   one row per trial; best.yaml, the best config at the base's full size

MLflow: a parent run for the sweep; each trial's run nested under it (tag `tune.trial_id`,
the trial's config as params, its metrics, a `status` tag: completed / early_stopped /
error; early-stopped runs end KILLED) with one child run per phase.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import yaml
from ray.tune import Callback
from rich.console import Console

from pipeline.config import ConfigError, absolute_paths, validate_config
from pipeline.phases.tune_trial import TIME_ATTR, find_trial_run
from pipeline.search.progress import TrialProgress
from pipeline.search.schedulers import make_scheduler
from pipeline.search.spec import (
    CHECKPOINT_PERIOD_S,
    SPEC_FILE,
    SWEEP_FILE,
    Sweep,
    SweepInterrupted,
    build_sweep,
    load_sweep,
    num_samples,
)
from pipeline.search.summary import (
    EPS_KIMG,
    SweepResult,
    describe_plan,
    dry_run_text,
    pick_best,
    record_sweep,
    rows_of,
    summary_table,
)
from pipeline.search.trial import run_trial
from pipeline.tracking.secrets import redact_uri
from preprocessing.object_store import display

__all__ = ["SweepInterrupted", "dry_run_text", "load_sweep", "resume_sweep", "start_sweep"]


class MlflowStatusCallback(Callback):
    """Tune callback (driver side): mark each ended trial's MLflow run at once."""

    def __init__(self, sweep: Sweep) -> None:
        self.uri, self.name = sweep.tracking_uri, sweep.name
        self.experiment, self.total = sweep.trial_cfg.tracking.experiment, sweep.trial_kimg

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        done = last.get(TIME_ATTR, 0.0) >= self.total - EPS_KIMG
        self.mark(trial.trial_id, "completed" if done else "early_stopped")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.mark(trial.trial_id, "error")

    def mark(self, trial_id: str, status: str) -> None:
        """Tag the trial's run; end it (and phase runs a stopped actor left open)."""
        from pipeline.tracking.tracker import Tracker

        with contextlib.suppress(Exception):  # tracking never stops the sweep
            tracker = Tracker(self.uri, self.experiment, ".")
            run_id = find_trial_run(tracker, self.name, trial_id)
            if run_id is None:
                return
            tracker.client.set_tag(run_id, "status", status)
            end = {"early_stopped": "KILLED", "error": "FAILED"}.get(status, "FINISHED")
            children = tracker.client.search_runs(
                [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'"
            )
            for run in [tracker.client.get_run(run_id), *children]:
                if run.info.status == "RUNNING":
                    tracker.finish(run.info.run_id, end if end != "FINISHED" else "KILLED")


def trial_resources(sweep: Sweep) -> dict[str, float]:
    """What one trial reserves: its worker (in-process trials), or its driver (multi-worker
    trials, whose Train workers reserve their own)."""
    s = sweep.trial_cfg.scaling
    if s.max_workers > 1:
        d = sweep.spec.trial_driver
        return {"CPU": d.cpus, "memory": int(d.memory_mb * 2**20)}
    return s.worker_resources


def make_trainable(sweep: Sweep, sweep_run_id: str):
    """The trial function with its context and resources, and the param space."""
    from ray import tune

    context = {
        "trial_raw": sweep.trial_raw,
        "metric": sweep.spec.search.metric,
        "tracking_uri": redact_uri(sweep.tracking_uri),
        "artifact_root": str(Path(sweep.base_cfg.run.root) / "mlartifacts"),
        "sweep_run_id": sweep_run_id,
        "sweep_name": sweep.name,
    }
    trainable = tune.with_parameters(run_trial, context=context)
    trainable = tune.with_resources(trainable, trial_resources(sweep))
    space = {dim.key: dim.to_tune(sweep.spec.search.algorithm) for dim in sweep.dimensions}
    return trainable, space


def make_tuner(sweep: Sweep, sweep_run_id: str, verbose: bool = False):
    """A new Tuner for the sweep: searcher, scheduler, storage in the sweep directory."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    s, pbt = sweep.spec.search, sweep.spec.scheduler.type == "pbt"
    progress = TrialProgress(sweep.trial_kimg, s.metric, sweep.trial_phases)
    limit = s.max_concurrent_trials
    trainable, space = make_trainable(sweep, sweep_run_id)
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher, tuner_limit = OptunaSearch(seed=s.seed), limit
    else:  # a SearchGenerator: Tune ignores TuneConfig's limit for it, it takes its own
        searcher = BasicVariantGenerator(random_state=s.seed, max_concurrent=limit or 0)
        tuner_limit = None
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            num_samples=num_samples(sweep.spec),
            search_alg=searcher,
            scheduler=make_scheduler(sweep),
            max_concurrent_trials=tuner_limit,
            trial_dirname_creator=lambda trial: trial.trial_id,
            # a new or restarted trial takes a free actor: no process start, no imports
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            storage_path=sweep.experiment_location[0],
            name=sweep.experiment_location[1],
            callbacks=[MlflowStatusCallback(sweep), progress],
            # PBT copies another trial's checkpoint: keep a few more of them
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2 if not pbt else 4),
            verbose=1 if verbose else 0,  # Tune's status table with -v; else search.progress
        ),
    )


def sweep_params(sweep: Sweep) -> dict[str, str]:
    """The sweep run's MLflow params."""
    from pipeline.tracking.tracker import flatten

    spec = sweep.spec.model_dump(mode="json", exclude={"base", "search_space", "trial"})
    params = flatten(spec)
    params.update({f"search_space.{d.key}": d.describe() for d in sweep.dimensions})
    params.update({f"trial.{k}": v for k, v in flatten(sweep.spec.trial).items()})
    params["trial.phases"] = str(sweep.trial_phases)
    params["trial.kimg"] = f"{sweep.trial_kimg:g}"
    return params


def sweep_tracker(sweep: Sweep):
    from pipeline.tracking.tracker import Tracker

    return Tracker(
        sweep.tracking_uri,
        sweep.trial_cfg.tracking.experiment,
        Path(sweep.base_cfg.run.root) / "mlartifacts",
    )


def start_ray(sweep: Sweep, address: str | None, console: Console) -> None:
    """Ray (local or the cluster), the dataset (prepared on that Ray if needed), then the
    pipeline's cluster checks once for the sweep."""
    from pipeline.driver.ray_session import check_cluster, start_ray, worker_env

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", CHECKPOINT_PERIOD_S)
    # mid-phase results (checkpoints) and phases below 8x8 carry no metric: the schedulers
    # skip them, Tune's strict check would fail the sweep
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # every Tune checkpoint forces an experiment snapshot (CheckpointConfig.num_to_keep):
    # what makes a kill lose nothing; no warning about it on each one
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start_ray(address or sweep.base_cfg.ray_address, sweep.tracking_uri)
    prepare_data(sweep, console)
    cfg, uri = sweep.trial_cfg, sweep.tracking_uri
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    check_cluster(cfg, uri, sweep.experiment_location[0], worker_env(uri))
    console.print("preflight: nodes ok")


def prepare_data(sweep: Sweep, console: Console) -> None:
    """Prepare the dataset once, at the base's full resolution, before trials share it."""
    from pipeline.dataset import ensure_dataset

    ensure_dataset(validate_config(absolute_paths(sweep.base_raw)), console)
    ensure_dataset(sweep.trial_cfg, console)


def start_sweep(
    sweep: Sweep,
    address: str | None = None,
    console: Console | None = None,
    verbose: bool = False,
) -> SweepResult:
    """Run a new sweep to the end; returns the summary (refuses an existing sweep dir)."""
    console = console or Console()
    if (sweep.sweep_dir / SPEC_FILE).exists() or (sweep.sweep_dir / "ray").exists():
        raise ConfigError(
            f"name: sweep {sweep.name} exists in {sweep.sweep_dir}; "
            f"continue it with --resume {sweep.sweep_dir}, or choose another name"
        )
    start_ray(sweep, address, console)
    tracker = sweep_tracker(sweep)
    tags = {"tune.sweep": sweep.name, "sweep_dir": str(sweep.sweep_dir), "kind": "tune-sweep"}
    sweep_run_id = tracker.start_run(sweep.name, tags)
    tracker.log_params(sweep_run_id, sweep_params(sweep))
    spec_dump = {**sweep.spec.model_dump(), "name": sweep.name}
    (sweep.sweep_dir / SPEC_FILE).write_text(yaml.safe_dump(spec_dump, sort_keys=False))
    uri = redact_uri(sweep.tracking_uri)
    info = {"name": sweep.name, "mlflow_run_id": sweep_run_id, "tracking_uri": uri}
    (sweep.sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2))
    tracker.log_artifact(sweep_run_id, sweep.sweep_dir / SPEC_FILE)
    limit = sweep.spec.search.max_concurrent_trials
    plan = describe_plan(sweep, limit)
    console.print(f"sweep [bold]{sweep.name}[/] in {sweep.sweep_dir}: {plan}")
    tuner = make_tuner(sweep, sweep_run_id, verbose)
    return execute(tuner, sweep, sweep_run_id, tracker, console)


def resume_sweep(
    sweep_dir: str | os.PathLike,
    address: str | None = None,
    console: Console | None = None,
    retry_errored: bool = False,
) -> SweepResult:
    """Continue an interrupted sweep: finished trials are kept, unfinished ones continue
    from their latest checkpoint (`Tuner.restore`)."""
    from ray import tune

    console = console or Console()
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir() and len(sweep_dir.parts) == 1:  # a bare name: the default root
        sweep_dir = Path("runs") / "tune" / sweep_dir
    sweep_dir = sweep_dir.resolve()
    if not (sweep_dir / SPEC_FILE).is_file() or not (sweep_dir / SWEEP_FILE).is_file():
        raise ConfigError(f"--resume: {sweep_dir} is not a sweep directory (no {SPEC_FILE})")
    sweep = build_sweep(yaml.safe_load((sweep_dir / SPEC_FILE).read_text()), sweep_dir)
    info = json.loads((sweep_dir / SWEEP_FILE).read_text())
    start_ray(sweep, address, console)
    experiment = sweep.experiment
    if not tune.Tuner.can_restore(experiment):
        raise ConfigError(f"--resume: {display(experiment)} holds no Tune experiment to restore")
    tracker = sweep_tracker(sweep)
    tracker.reopen(info["mlflow_run_id"])
    trainable, space = make_trainable(sweep, info["mlflow_run_id"])
    tuner = tune.Tuner.restore(
        experiment,
        trainable=trainable,
        param_space=space,
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=retry_errored,
    )
    console.print(f"resuming sweep [bold]{sweep.name}[/] in {sweep_dir}")
    return execute(tuner, sweep, info["mlflow_run_id"], tracker, console)


def unfinished_trials(sweep: Sweep) -> list[str]:
    """Trials that Tune's saved experiment state has neither TERMINATED nor ERROR."""
    import logging

    from ray.tune import ExperimentAnalysis

    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # trials without results yet are not worth a warning
    try:
        analysis = ExperimentAnalysis(sweep.experiment)
    finally:
        quiet.setLevel(level)
    return [t.trial_id for t in analysis.trials if t.status not in ("TERMINATED", "ERROR")]


def execute(tuner, sweep: Sweep, sweep_run_id: str, tracker, console: Console) -> SweepResult:
    """Fit, then summarise from the ResultGrid and pick the best; the sweep run ends."""
    started = time.perf_counter()
    try:
        grid = tuner.fit()
    except BaseException:
        tracker.finish(sweep_run_id, "FAILED")
        raise
    # Ctrl-C makes Tune save its state and return as if done; the saved state (what
    # --resume restores) still has the unfinished trials RUNNING or PENDING.
    unfinished = unfinished_trials(sweep)
    if unfinished:
        tracker.finish(sweep_run_id, "KILLED")
        raise SweepInterrupted(
            f"sweep interrupted with {len(unfinished)} trial(s) unfinished; continue it with: "
            f"progan tune --resume {sweep.sweep_dir}"
        )
    rows = rows_of(sweep, grid)
    best = pick_best(rows, sweep.spec.search.mode)
    best_path = record_sweep(sweep, rows, best, tracker, sweep_run_id)
    tracker.finish(sweep_run_id)
    console.print(summary_table(sweep, rows, best))
    wall_s = time.perf_counter() - started
    return SweepResult(
        sweep.sweep_dir, rows, best, best_path, sweep.tracking_uri, sweep_run_id, wall_s
    )
