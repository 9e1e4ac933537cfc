"""The pipeline driver: prepare data if asked, then one Ray Train job per phase.

`run_pipeline` walks the config's phase plan. Finished phases (recorded in the run
directory's state.json) are skipped; an unfinished one is refitted under the same Ray run
name, which makes Ray Train V2 resume it from its latest checkpoint in storage. Each phase
starts from the previous phase's final checkpoint in storage (pipeline.driver.storage):
workers never open a file that only the driver's disk holds. Before the first phase a
preflight (pipeline.driver.preflight) checks every node that may host a worker. MLflow
holds a parent run for the pipeline run and a child run per phase; what a phase does on
the workers is pipeline.phases (the Ray Train host).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline.config import ConfigError, PipelineConfig
from pipeline.dataset import ensure_dataset
from pipeline.driver.phase_driver import PhaseDriver, PhaseFailedError
from pipeline.driver.ray_session import check_cluster, start_ray, worker_env
from pipeline.driver.run_dir import (
    GENERATOR_FILE,
    PHASES_FILE,
    STATE_FILE,
    new_run_id,
    open_run_dir,
    phase_table_markdown,
    run_dir_of,
)
from pipeline.driver.state import RunLock, RunState
from pipeline.driver.storage import (
    check_free_space,
    claim_storage,
    storage_root,
    with_storage_credentials,
)
from pipeline.phases.ray_train import WorkerFn
from pipeline.phases.session import PhaseJob
from pipeline.progress import PROGRESS_FILE, ProgressDisplay
from pipeline.tracking.secrets import redact_uri
from pipeline.tracking.tracker import Tracker, flatten, resolve_uri
from progan.schedule import Phase

__all__ = ["PhaseFailedError", "RunResult", "run_pipeline"]


@dataclass
class RunResult:
    """Where a finished run's outputs are."""

    run_id: str
    run_dir: Path
    generator: Path
    tracking_uri: str
    parent_run_id: str
    phases: list[dict[str, Any]]


def run_pipeline(
    cfg: PipelineConfig,
    run_id: str | None = None,
    console: Console | None = None,
    test_hooks: dict[str, Any] | None = None,
    on_phase_end: Callable[[Phase, dict[str, float]], None] | None = None,
    parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
    worker_fn: WorkerFn | None = None,
    preflight: bool = True,
) -> RunResult:
    """Run (or continue) every phase of the plan; returns where the results are.

    `on_phase_end(phase, metrics)` is called after each phase trained here (not for phases
    done earlier) with its wall time, Ray overhead and end-of-phase evaluation metrics.
    `parent_run_id` nests the run's MLflow parent run under another run (a Tune sweep's)
    and `run_tags` are added to it, when it is created. `worker_fn` replaces the per-rank
    function (tests wrap `pipeline.phases.ray_train.phase_worker` to inject faults) and
    `test_hooks` reach it as the jobs' `hooks`. A second process on the same run is refused
    (RunLockedError).
    """
    console = console or Console()
    run_dir = run_dir_of(cfg, run_id or new_run_id())
    with RunLock(run_dir):
        return _run_locked(
            cfg,
            run_dir,
            console,
            test_hooks or {},
            on_phase_end,
            parent_run_id,
            run_tags,
            worker_fn,
            preflight,
        )


def _run_locked(
    cfg: PipelineConfig,
    run_dir: Path,
    console: Console,
    test_hooks: dict[str, Any],
    on_phase_end: Callable[[Phase, dict[str, float]], None] | None,
    parent_run_id: str | None,
    run_tags: dict[str, str] | None,
    worker_fn: WorkerFn | None,
    preflight: bool,
) -> RunResult:
    from pipeline.phases.mailbox import Mailbox
    from pipeline.tools.registry import publish_generator

    run_id, plan = run_dir.name, cfg.plan
    state = open_run_dir(cfg, run_dir)
    generator = run_dir / GENERATOR_FILE
    if state.finished and generator.is_file():  # needs neither data nor Ray
        console.print(f"run {run_id}: all phases done earlier ({run_dir})")
        rows = [
            {"phase": p.name, "status": "skipped (done earlier)", **state.phase(p.index).evaluation}
            for p in plan
        ]
        uri = state.tracking_uri or ""
        return RunResult(run_id, run_dir, generator, uri, state.parent_run_id or "", rows)
    uri = resolve_uri(cfg.tracking.uri, cfg.run.root)
    tracker = Tracker(  # first: a server that does not answer fails the run before Ray starts
        uri,
        cfg.tracking.experiment,
        Path(cfg.run.root) / "mlartifacts",
        outage_wait_s=cfg.tracking.outage_wait_s,
        say=lambda text: console.print(f"[yellow]{text}[/]", highlight=False),
    )
    start_ray(cfg.ray_address, uri)  # before the data: a prepare from data.source runs on it
    ensure_dataset(cfg, console)
    check_same_dataset(cfg, state)
    storage = storage_root(cfg, run_dir)
    if cfg.run.storage_path is not None:  # a storage other runs may share
        if state.storage_claim is None:
            state.storage_claim = secrets.token_hex(8)
            state.save(run_dir / STATE_FILE)  # before the marker: a kill between keeps both
        claim_storage(storage, run_id, state.storage_claim, run_dir)
    env = worker_env(uri)
    if preflight:
        started = time.perf_counter()
        check_cluster(cfg, uri, storage, env)
        console.print(f"preflight: nodes ok ({time.perf_counter() - started:.1f} s)")
    state.tracking_uri = redact_uri(uri)
    if state.parent_run_id is None:
        tags = {"run_id": run_id, "run_dir": str(run_dir), "storage": storage, **(run_tags or {})}
        state.parent_run_id = tracker.start_run(run_id, tags, parent_id=parent_run_id)
        tracker.log_params(state.parent_run_id, flatten(cfg.model_dump(mode="json")))
        tracker.log_dataset(state.parent_run_id, cfg.data.dataset)
    else:
        tracker.reopen(state.parent_run_id)
    state.save(run_dir / STATE_FILE)
    console.print(
        f"run [bold]{run_id}[/] in {run_dir}; storage {redact_uri(storage)}; "
        f"MLflow: {redact_uri(uri)}"
    )

    mailbox = Mailbox()
    display = ProgressDisplay(run_id, plan, console, run_dir / PROGRESS_FILE)
    driver = PhaseDriver(cfg, run_dir, state, tracker, mailbox, console, display)
    rows: list[dict[str, Any]] = []
    previous: str | None = None
    ps = None
    try:
        for phase in plan:
            ps = state.phase(phase.index)
            if ps.done:
                console.print(f"phase {phase.name}: done earlier, skipped")
                previous = with_storage_credentials(ps.checkpoint or "", storage) or None
                rows.append({"phase": phase.name, "status": "skipped (done earlier)"})
                rows[-1].update(ps.evaluation)
                continue
            check_free_space(cfg, storage)
            job = PhaseJob(cfg, phase.index, init_checkpoint=previous, hooks=test_hooks)
            row = driver.train(job, storage, env, worker_fn)
            previous = ps.checkpoint
            rows.append(row)
            if on_phase_end is not None:
                on_phase_end(phase, {k: v for k, v in row.items() if k not in ("phase", "status")})
    except BaseException as err:
        # stopped (Ctrl-C, SIGTERM, a Tune scheduler's sys.exit) vs broken
        status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
        display.close_after(err, f"continue with `progan resume {run_dir}`")
        for run in (ps.child_run_id if ps and not ps.done else None, state.parent_run_id):
            problem = tracker.try_finish(run, status) if run else None
            if problem:
                console.print(f"[yellow]MLflow: run {run} not marked {status} ({problem})[/]")
        raise
    finally:
        mailbox.close()

    table = run_dir / PHASES_FILE
    table.write_text(phase_table_markdown(plan, rows))
    tracker.log_artifact(state.parent_run_id, table)
    tracker.log_table(state.parent_run_id, rows, "phases.json")
    tracker.client.set_tag(state.parent_run_id, "checkpoint", redact_uri(str(previous)))
    publish_generator(cfg, tracker, state, generator, console)  # the registered model
    tracker.finish(state.parent_run_id)
    state.finished = True
    state.save(run_dir / STATE_FILE)
    display.close("done")
    return RunResult(run_id, run_dir, generator, uri, state.parent_run_id, rows)


def check_same_dataset(cfg: PipelineConfig, state: RunState) -> None:
    """Refuse to continue a run on a dataset prepared again since it started (another
    source or options in the same folder): its phases would mix two datasets."""
    from preprocessing.lmdb_store import read_manifest

    fingerprint = str(read_manifest(cfg.data.dataset).get("fingerprint"))
    if state.dataset_fingerprint not in (None, fingerprint):
        raise ConfigError(
            f"data.dataset: {cfg.data.dataset} was prepared again since run {state.run_id} "
            f"started (fingerprint {state.dataset_fingerprint} then, {fingerprint} now); "
            "continuing would mix two datasets: start a new --run-id"
        )
    state.dataset_fingerprint = fingerprint
