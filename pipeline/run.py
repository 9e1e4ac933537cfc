"""The pipeline driver: prepare data if asked, then one Ray Train job per phase.

`run_pipeline` walks the phase plan from `progan.schedule`. Finished phases (recorded in
the run directory's state.json) are skipped; an unfinished one is refitted under the same
Ray run name, which makes Ray Train V2 resume it from its latest checkpoint. MLflow holds
a parent run for the pipeline run and a child run per phase.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.common import changed_since, ensure_dataset, export_generator
from pipeline.config import (
    ConfigError,
    PipelineConfig,
    dump_config,
)
from pipeline.state import RunState
from pipeline.tracking import Tracker, flatten, resolve_uri
from progan.schedule import Phase, phase_plan

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
# Keys that may change when a run is resumed; anything else must match the original.
RESUMABLE_CHANGES = ("ray_address", "run.max_failures", "tracking.uri", "eval.")


@dataclass
class RunResult:
    """Where a finished run's outputs are."""

    run_id: str
    run_dir: Path
    generator: Path
    tracking_uri: str
    parent_run_id: str
    phases: list[dict[str, Any]]


def new_run_id() -> str:
    """A fresh, sortable run id."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def plan_table(cfg: PipelineConfig, plan: list[Phase]) -> Table:
    """The phase plan as a rich table."""
    workers = cfg.scaling.num_workers
    table = Table(title=f"phase plan ({workers} worker{'s' if workers > 1 else ''})")
    for col in ("#", "resolution", "kind", "kimg", "batch", "per worker", "lr", "steps"):
        table.add_column(col, justify="right")
    for p in plan:
        table.add_row(
            str(p.index),
            f"{p.resolution}x{p.resolution}",
            p.kind,
            f"{p.num_images / 1000:g}",
            str(p.batch_size),
            str(p.batch_size // workers),
            f"{p.lr:g}",
            str(p.steps),
        )
    return table


def open_run_dir(cfg: PipelineConfig, run_id: str) -> tuple[Path, RunState]:
    """Create or reopen a run directory; refuse to resume under a changed config."""
    run_dir = Path(cfg.run.root).resolve() / run_id
    config_path, state_path = run_dir / CONFIG_FILE, run_dir / STATE_FILE
    if state_path.is_file():
        changed = changed_since(config_path, cfg, RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(
                f"run {run_id} exists with a different config ({', '.join(changed)}); "
                "use a new --run-id, or `progan resume` to continue it unchanged"
            )
        state = RunState.load(state_path)
    else:
        state = RunState(run_id=run_id)
    dump_config(cfg, config_path)
    state.save(state_path)
    return run_dir, state


# Ray Train V2's controller polls the worker group every 2 s by default; each phase waits
# for at least one poll at its start and end. 0.2 s cut the fixed cost per phase from
# ~21 s to ~13 s here (docs/benchmarks.md).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray(address: str | None) -> None:
    """Join `address` (or $RAY_ADDRESS), else start a local Ray, unless one is running."""
    import os

    import ray

    if ray.is_initialized():
        return
    missing = {k: v for k, v in RAY_ENV.items() if k not in os.environ}  # a Ray Job sets them
    os.environ.update(missing)  # a local Ray started here inherits them
    ray.init(address=address, runtime_env={"env_vars": missing} if missing else None)


def fit_phase(
    cfg: PipelineConfig,
    phase: Phase,
    run_dir: Path,
    ray_name: str,
    worker_config: dict[str, Any],
):
    """One Ray Train TorchTrainer job for `phase`; returns Ray's Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.worker import phase_worker

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    trainer = TorchTrainer(
        phase_worker,
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=ray_name,
            storage_path=str(Path(cfg.run.storage_path or run_dir / "ray").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
    )
    return trainer.fit()


def run_pipeline(
    cfg: PipelineConfig,
    run_id: str | None = None,
    console: Console | None = None,
    test_hooks: dict[str, Any] | None = None,
    on_phase_end: Callable[[Phase, dict[str, float]], None] | None = None,
    parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
) -> RunResult:
    """Run (or continue) every phase of the plan; returns where the results are.

    `on_phase_end(phase, metrics)` is called after each phase trained here (not for phases
    done earlier) with its wall time, Ray overhead and end-of-phase evaluation metrics.
    `parent_run_id` nests the run's MLflow parent run under another run (a Tune sweep's)
    and `run_tags` are added to it, when it is created.
    """
    console = console or Console()
    plan = phase_plan(cfg.schedule, cfg.model.resolution)
    run_id = run_id or new_run_id()
    ensure_dataset(cfg, plan, console)
    run_dir, state = open_run_dir(cfg, run_id)
    uri = resolve_uri(cfg.tracking.uri, cfg.run.root)
    tracker = Tracker(uri, cfg.tracking.experiment, Path(cfg.run.root) / "mlartifacts")
    state.tracking_uri = uri
    if state.parent_run_id is None:
        tags = {"run_id": run_id, "run_dir": str(run_dir), **(run_tags or {})}
        state.parent_run_id = tracker.start_run(run_id, tags, parent_id=parent_run_id)
        tracker.log_params(state.parent_run_id, flatten(cfg.model_dump(mode="json")))
    else:
        tracker.reopen(state.parent_run_id)
    state.save(run_dir / STATE_FILE)
    console.print(f"run [bold]{run_id}[/] in {run_dir}; MLflow: {uri}")
    init_ray(cfg.ray_address)

    worker_cfg = cfg.model_dump(mode="json")  # workers may run elsewhere: absolute paths
    worker_cfg["data"]["dataset"] = str(Path(cfg.data.dataset).resolve())
    previous: str | None = None
    rows: list[dict[str, Any]] = []
    for phase in plan:
        ps = state.phase(phase.index)
        if ps.done:
            console.print(f"phase {phase.name}: done earlier, skipped")
            previous = ps.checkpoint
            rows.append({"phase": phase.name, "status": "skipped (done earlier)", **ps.evaluation})
            continue
        ps.ray_name = ps.ray_name or f"{run_id}-{phase.name}"
        if ps.child_run_id is None:
            tags = {
                "resolution": str(phase.resolution),
                "phase_kind": phase.kind,
                "phase_index": str(phase.index),
                "images": str(phase.num_images),
                "ray_run_name": ps.ray_name,
            }
            ps.child_run_id = tracker.start_run(phase.name, tags, parent_id=state.parent_run_id)
        else:
            tracker.reopen(ps.child_run_id)
        state.save(run_dir / STATE_FILE)
        console.print(f"phase {phase.name}: {phase.num_images} images, batch {phase.batch_size}")
        worker_config = {
            "cfg": worker_cfg,
            "phase_index": phase.index,
            "init_checkpoint": previous,
            "run_dir": str(run_dir),
            "tracking_uri": uri,
            "child_run_id": ps.child_run_id,
            **(test_hooks or {}),
        }
        started = time.perf_counter()
        try:
            result = fit_phase(cfg, phase, run_dir, ps.ray_name, worker_config)
        except BaseException:
            tracker.finish(ps.child_run_id, "FAILED")
            tracker.finish(state.parent_run_id, "FAILED")
            raise
        wall = time.perf_counter() - started
        final = run_dir / "checkpoints" / f"{phase.name}.pt"
        final.parent.mkdir(parents=True, exist_ok=True)
        with result.checkpoint.as_directory() as d:
            shutil.copyfile(Path(d) / "state.pt", final)
        overhead = wall - float(result.metrics.get("train_seconds", wall))
        tracker.log_metrics(
            ps.child_run_id,
            {"phase_wall_s": wall, "ray_overhead_s": overhead},
            phase.end_images,
        )
        evaluation = {k: float(v) for k, v in result.metrics.get("eval", {}).items()}
        ps.evaluation = evaluation
        if evaluation:  # the parent run gets each phase's numbers too: one curve per metric
            tracker.log_metrics(state.parent_run_id, evaluation, phase.end_images)
        if cfg.tracking.log_checkpoints:
            tracker.log_artifact(ps.child_run_id, final, "checkpoint")
        tracker.finish(ps.child_run_id)
        ps.done, ps.checkpoint, previous = True, str(final), str(final)
        state.save(run_dir / STATE_FILE)
        rows.append(
            {
                "phase": phase.name,
                "status": "trained",
                "wall_s": round(wall, 1),
                "ray_overhead_s": round(overhead, 1),
                **evaluation,
            }
        )
        note = f", SWD {evaluation['SWDx1e3_avg']:.1f}" if "SWDx1e3_avg" in evaluation else ""
        console.print(
            f"phase {phase.name}: done in {wall:.1f} s (Ray overhead {overhead:.1f} s){note}"
        )
        if on_phase_end is not None:
            on_phase_end(phase, {"wall_s": wall, "ray_overhead_s": overhead, **evaluation})

    generator = export_generator(Path(previous), run_dir / "generator.pt")
    table = run_dir / "phases.md"
    table.write_text(phase_table_markdown(plan, rows))
    tracker.log_artifact(state.parent_run_id, generator)
    tracker.log_artifact(state.parent_run_id, table)
    tracker.finish(state.parent_run_id)
    state.finished = True
    state.save(run_dir / STATE_FILE)
    return RunResult(run_id, run_dir, generator, uri, state.parent_run_id, rows)


def phase_table_markdown(plan: list[Phase], rows: list[dict[str, Any]]) -> str:
    """The plan and what happened to each phase, as a Markdown table."""
    lines = [
        "| # | phase | resolution | kind | kimg | batch | lr | status | wall s | Ray overhead s "
        "| SWD x1e3 (real floor) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p, r in zip(plan, rows, strict=True):
        swd = ""
        if "SWDx1e3_avg" in r:
            swd = f"{r['SWDx1e3_avg']:.1f} ({r.get('SWDx1e3_avg_real_floor', float('nan')):.1f})"
        lines.append(
            f"| {p.index} | {p.name} | {p.resolution} | {p.kind} | {p.num_images / 1000:g} "
            f"| {p.batch_size} | {p.lr:g} | {r['status']} | {r.get('wall_s', '')} "
            f"| {r.get('ray_overhead_s', '')} | {swd} |"
        )
    return "\n".join(lines) + "\n"
