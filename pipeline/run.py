"""The pipeline driver: prepare data if asked, then one Ray Train job per phase.

`run_pipeline` walks the phase plan from `progan.schedule`. Finished phases (recorded in
the run directory's state.json) are skipped; an unfinished one is refitted under the same
Ray run name, which makes Ray Train V2 resume it from its latest checkpoint in storage.
Each phase starts from the previous phase's final checkpoint in storage (pipeline.storage):
workers never open a file that only the driver's disk holds. Before the first phase a
preflight (pipeline.preflight) checks every node that may host a worker. MLflow holds a
parent run for the pipeline run and a child run per phase.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.common import changed_since, ensure_dataset
from pipeline.config import ConfigError, PipelineConfig, dump_config, load_config_dict
from pipeline.model_registry import publish_generator
from pipeline.state import RunLock, RunState
from pipeline.storage import STATE_FILE as CHECKPOINT_STATE
from pipeline.storage import (
    check_free_space,
    checkpoint_uri,
    export_generator,
    storage_root,
)
from pipeline.tracking import (
    Tracker,
    flatten,
    is_local_store,
    local_store_refusal,
    resolve_uri,
    tracking_env,
)
from progan.schedule import Phase, phase_plan

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
# Keys that may change when a run is resumed; anything else must match the original.
# (run.root: the state is found under root/run id, so it is this run wherever it moved.)
RESUMABLE_CHANGES = (
    "ray_address",
    "run.max_failures",
    "run.root",
    "tracking.uri",
    "tracking.registered_model",
    "tracking.system_metrics_interval_s",
    "eval.",
)


class PhaseFailedError(RuntimeError):
    """A phase ended in a way a restart cannot mend (e.g. a non-finite loss)."""


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
    table = Table(title=f"phase plan (workers: {workers})")
    for col in ("#", "resolution", "kind", "kimg", "batch", "per worker", "lr", "steps"):
        table.add_column(col, justify="right")
    for p in plan:
        table.add_row(
            str(p.index),
            f"{p.resolution}x{p.resolution}",
            p.kind,
            f"{p.num_images / 1000:g}",
            str(p.batch_size),
            str(p.batch_size // cfg.scaling.workers_for(p.resolution)),
            f"{p.lr:g}",
            str(p.steps),
        )
    return table


def run_dir_of(cfg: PipelineConfig, run_id: str) -> Path:
    """`<run.root>/<run id>` as an absolute path."""
    return Path(os.path.normpath(Path(cfg.run.root).absolute() / run_id))


def origin_of(run_dir: Path) -> Path:
    """The directory a run's relative config paths were relative to: the working directory
    of the `progan run` that started it (run.root was relative to it too), or here if
    unknown. Runs saved since paths are made absolute at load time need none of this."""
    saved_root = str(load_config_dict(run_dir / CONFIG_FILE).get("run", {}).get("root", ""))
    root = Path(saved_root)
    if not saved_root or root.is_absolute() or ".." in root.parts:
        return Path.cwd()
    base = run_dir.absolute().parent
    for _ in root.parts:
        base = base.parent
    return base


def open_run_dir(cfg: PipelineConfig, run_dir: Path) -> RunState:
    """Create or reopen a run directory; refuse to resume under a changed config."""
    config_path, state_path = run_dir / CONFIG_FILE, run_dir / STATE_FILE
    if state_path.is_file():
        changed = changed_since(config_path, cfg, RESUMABLE_CHANGES, base=origin_of(run_dir))
        if changed:
            raise ConfigError(
                f"run {run_dir.name} exists with a different config ({', '.join(changed)}); "
                "use a new --run-id, or `progan resume` to continue it unchanged"
            )
        state = RunState.load(state_path)
    else:
        state = RunState(run_id=run_dir.name)
    dump_config(cfg, config_path)
    state.save(state_path)
    return state


# Ray Train V2's controller polls the worker group every 2 s by default; each phase waits
# for at least one poll at its start and end. 0.2 s cut the fixed cost per phase from
# ~21 s to ~13 s here (docs/benchmarks.md).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def project_modules() -> list[str]:
    """The project's package folders, shipped to a cluster as Ray `py_modules`."""
    import pipeline
    import preprocessing
    import progan

    return [str(Path(m.__file__).parent) for m in (progan, preprocessing, pipeline)]


def init_ray(address: str | None) -> None:
    """Join `address` (or $RAY_ADDRESS), else start a local Ray, unless one is running.

    Joining a cluster by address ships the project's code with the job (as `progan submit`
    does), so worker nodes run the driver's code whatever they have installed.
    """
    import ray

    if ray.is_initialized():
        return
    missing = {k: v for k, v in RAY_ENV.items() if k not in os.environ}  # a Ray Job sets them
    os.environ.update(missing)  # a local Ray started here inherits them
    runtime_env: dict[str, Any] = {"env_vars": missing} if missing else {}
    if address:
        runtime_env["py_modules"] = project_modules()
    ray.init(address=address, runtime_env=runtime_env or None)


def worker_env(uri: str) -> dict[str, str]:
    """Environment of every training worker and preflight task: Ray's settings and MLflow's
    (tracking URI, auth variables), through the runtime env, whatever node they run on."""
    return {**RAY_ENV, **tracking_env(uri)}


def fit_phase(
    cfg: PipelineConfig,
    storage: str,
    ray_name: str,
    worker_config: dict[str, Any],
    env: dict[str, str],
    worker_fn: Callable[[dict[str, Any]], None] | None = None,
):
    """One Ray Train TorchTrainer job for a phase; returns Ray's Result."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.worker import phase_worker

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            """Ctrl-C during a fit: Ray Train V2's own handler aborts the controller and
            then exits the process in varying ways (exit 0, exit 1, an actor error). This
            one aborts it too and raises KeyboardInterrupt, so the driver marks its runs
            KILLED and the CLI exits 130 with a resume hint."""
            import signal

            def on_sigint(signum: int, frame: object) -> None:
                with contextlib.suppress(Exception):
                    ray.get(controller.abort.remote(), timeout=30)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

    s = cfg.scaling
    phase = phase_plan(cfg.schedule, cfg.model.resolution)[worker_config["phase_index"]]
    trainer = Trainer(
        worker_fn or phase_worker,
        train_loop_config=worker_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.workers_for(phase.resolution),  # each phase its own count
            use_gpu=s.use_gpu,
            resources_per_worker=s.worker_resources,
        ),
        run_config=ray.train.RunConfig(
            name=ray_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()


def check_cluster(cfg: PipelineConfig, uri: str, plan: list[Phase], storage: str, env) -> None:
    """Refuse a node-local MLflow store where workers may run elsewhere; then preflight."""
    from pipeline.preflight import run_preflight, workers_may_run_elsewhere

    if is_local_store(uri) and workers_may_run_elsewhere(cfg.scaling.worker_resources):
        raise ConfigError(local_store_refusal(uri))
    run_preflight(
        cfg.scaling.worker_resources,
        cfg.data.dataset,
        sorted({p.resolution for p in plan}),
        storage,
        uri,
        env,
    )


def run_pipeline(
    cfg: PipelineConfig,
    run_id: str | None = None,
    console: Console | None = None,
    test_hooks: dict[str, Any] | None = None,
    on_phase_end: Callable[[Phase, dict[str, float]], None] | None = None,
    parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
    worker_fn: Callable[[dict[str, Any]], None] | None = None,
    preflight: bool = True,
) -> RunResult:
    """Run (or continue) every phase of the plan; returns where the results are.

    `on_phase_end(phase, metrics)` is called after each phase trained here (not for phases
    done earlier) with its wall time, Ray overhead and end-of-phase evaluation metrics.
    `parent_run_id` nests the run's MLflow parent run under another run (a Tune sweep's)
    and `run_tags` are added to it, when it is created. `worker_fn` replaces the per-rank
    function (tests wrap `pipeline.worker.phase_worker` to inject faults) and `test_hooks`
    are added to its config. A second process on the same run is refused (RunLockedError).
    """
    console = console or Console()
    run_id = run_id or new_run_id()
    run_dir = run_dir_of(cfg, run_id)
    with RunLock(run_dir):
        return _run_locked(
            cfg,
            run_dir,
            console,
            test_hooks,
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
    test_hooks: dict[str, Any] | None,
    on_phase_end: Callable[[Phase, dict[str, float]], None] | None,
    parent_run_id: str | None,
    run_tags: dict[str, str] | None,
    worker_fn: Callable[[dict[str, Any]], None] | None,
    preflight: bool,
) -> RunResult:
    from pipeline.mailbox import Mailbox

    run_id = run_dir.name
    plan = phase_plan(cfg.schedule, cfg.model.resolution)
    state = open_run_dir(cfg, run_dir)
    if state.finished and (run_dir / "generator.pt").is_file():  # needs neither data nor Ray
        console.print(f"run {run_id}: all phases done earlier ({run_dir})")
        rows = [
            {"phase": p.name, "status": "skipped (done earlier)", **state.phase(p.index).evaluation}
            for p in plan
        ]
        generator, uri = run_dir / "generator.pt", state.tracking_uri or ""
        return RunResult(run_id, run_dir, generator, uri, state.parent_run_id or "", rows)
    init_ray(cfg.ray_address)  # first: a prepare from data.source runs on this Ray too
    ensure_dataset(cfg, plan, console)
    uri = resolve_uri(cfg.tracking.uri, cfg.run.root)
    storage = storage_root(cfg, run_dir)
    env = worker_env(uri)
    if preflight:
        started = time.perf_counter()
        check_cluster(cfg, uri, plan, storage, env)
        console.print(f"preflight: nodes ok ({time.perf_counter() - started:.1f} s)")
    tracker = Tracker(uri, cfg.tracking.experiment, Path(cfg.run.root) / "mlartifacts")
    state.tracking_uri = uri
    if state.parent_run_id is None:
        tags = {"run_id": run_id, "run_dir": str(run_dir), "storage": storage, **(run_tags or {})}
        state.parent_run_id = tracker.start_run(run_id, tags, parent_id=parent_run_id)
        tracker.log_params(state.parent_run_id, flatten(cfg.model_dump(mode="json")))
        tracker.log_dataset(state.parent_run_id, cfg.data.dataset)
    else:
        tracker.reopen(state.parent_run_id)
    state.save(run_dir / STATE_FILE)
    console.print(f"run [bold]{run_id}[/] in {run_dir}; storage {storage}; MLflow: {uri}")

    mailbox = Mailbox()
    driver = PhaseDriver(cfg, run_dir, state, tracker, mailbox, console)
    rows: list[dict[str, Any]] = []
    previous: str | None = None
    ps = None
    try:
        for phase in plan:
            ps = state.phase(phase.index)
            if ps.done:
                console.print(f"phase {phase.name}: done earlier, skipped")
                previous = ps.checkpoint
                rows.append({"phase": phase.name, "status": "skipped (done earlier)"})
                rows[-1].update(ps.evaluation)
                continue
            check_free_space(cfg, storage)
            worker_config = {
                "cfg": cfg.model_dump(mode="json"),
                "phase_index": phase.index,
                "init_checkpoint": previous,
                "tracking_uri": uri,
                "parent_run_id": state.parent_run_id,
                "system_metrics_interval_s": cfg.tracking.system_metrics_interval_s,
                "mailbox": mailbox.handle,
                **(test_hooks or {}),
            }
            row = driver.train(phase, storage, worker_config, env, worker_fn)
            previous = ps.checkpoint
            rows.append(row)
            if on_phase_end is not None:
                on_phase_end(phase, {k: v for k, v in row.items() if k not in ("phase", "status")})
    except BaseException as err:
        # stopped (Ctrl-C, SIGTERM, a Tune scheduler's sys.exit) vs broken
        status = "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"
        for run in (ps.child_run_id if ps and not ps.done else None, state.parent_run_id):
            if run:
                tracker.finish(run, status)
        raise
    finally:
        mailbox.close()

    generator = export_generator(previous, run_dir / "generator.pt")
    table = run_dir / "phases.md"
    table.write_text(phase_table_markdown(plan, rows))
    tracker.log_artifact(state.parent_run_id, table)
    tracker.log_table(state.parent_run_id, rows, "phases.json")
    tracker.client.set_tag(state.parent_run_id, "checkpoint", previous)
    publish_generator(cfg, tracker, state, generator, console)  # the registered model
    tracker.finish(state.parent_run_id)
    state.finished = True
    state.save(run_dir / STATE_FILE)
    return RunResult(run_id, run_dir, generator, uri, state.parent_run_id, rows)


class PhaseDriver:
    """The driver's side of one phase: MLflow child run, the fit, what workers said."""

    def __init__(self, cfg, run_dir: Path, state: RunState, tracker: Tracker, mailbox, console):
        self.cfg, self.run_dir, self.state = cfg, run_dir, state
        self.tracker, self.mailbox, self.console = tracker, mailbox, console

    def train(
        self,
        phase: Phase,
        storage: str,
        worker_config: dict[str, Any],
        env: dict[str, str],
        worker_fn: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        """Fit `phase`, record its final checkpoint and metrics; returns its table row."""
        state, tracker, console = self.state, self.tracker, self.console
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
        worker_config = {**worker_config, "child_run_id": ps.child_run_id}
        started = time.perf_counter()
        try:
            result = fit_phase(self.cfg, storage, ps.ray_name, worker_config, env, worker_fn)
        finally:
            self.read_mailbox(phase)
        wall = time.perf_counter() - started
        if not result.metrics or not result.metrics.get("final"):
            raise PhaseFailedError(
                f"phase {phase.name} ended without its final checkpoint (last report: "
                f"{result.metrics}); `progan resume` continues from the latest one"
            )
        ps.checkpoint = checkpoint_uri(storage, ps.ray_name, result.checkpoint.path)
        overhead = wall - float(result.metrics.get("train_seconds", wall))
        tracker.log_metrics(
            ps.child_run_id, {"phase_wall_s": wall, "ray_overhead_s": overhead}, phase.end_images
        )
        evaluation = {k: float(v) for k, v in result.metrics.get("eval", {}).items()}
        ps.evaluation = evaluation
        if evaluation:  # the parent run gets each phase's numbers too: one curve per metric
            tracker.log_metrics(state.parent_run_id, evaluation, phase.end_images)
        if self.cfg.tracking.log_checkpoints:
            with result.checkpoint.as_directory() as d:
                tracker.log_artifact(ps.child_run_id, Path(d) / CHECKPOINT_STATE, "checkpoint")
        tracker.client.set_tag(ps.child_run_id, "checkpoint", ps.checkpoint)
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
        self.state.save(self.run_dir / STATE_FILE)
        if ps.starts and ps.child_run_id:
            starts = ", ".join(f"{s['origin']}@{s['images']}" for s in ps.starts)
            self.safe(lambda: self.tracker.client.set_tag(ps.child_run_id, "starts", starts))
        if nonfinite:
            raise PhaseFailedError(f"phase {phase.name}: {nonfinite}")

    def recover_tracking(self, phase: Phase, m: dict[str, Any]) -> None:
        """Rank 0 could not deliver everything: log it from here, else keep it beside the
        run (pipeline.tracking.Tracker.replay); either way say so and tag the phase run."""
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
