"""`progan run CONFIG [key=value ...]` and `progan resume RUN_DIR`: the training pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.failures import verbose


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `run` and `resume` subcommands."""
    p = subparsers.add_parser(
        "run",
        help="train progressively: one Ray Train job per phase, tracked in MLflow",
        description="Run every phase of the plan (or continue a run with the same --run-id).",
    )
    p.add_argument("config", help="YAML config, e.g. conf/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--run-id", default=None, help="continue this run (default: a new id)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write the config")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.set_defaults(func=run)

    r = subparsers.add_parser(
        "resume", help="continue an interrupted run", description="Continue RUN_DIR's run."
    )
    r.add_argument("run_dir", help="runs/<run id>")
    r.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    r.set_defaults(func=resume)


def run(args: argparse.Namespace) -> int:
    """Validate, then dry-run or run the pipeline; config errors are one line, exit 2."""
    from pipeline.config import load_config

    console = console_for_run()
    try:
        overrides = list(args.overrides) + ([f"ray_address={args.address}"] if args.address else [])
        cfg = load_config(args.config, overrides)
    except ValueError as err:  # ConfigError
        console.print(f"[red]config error:[/] {err}", highlight=False)
        return 2
    return run_config(cfg, args.run_id, args.dry_run, console, verbose(args))


def console_for_run():
    from rich.console import Console

    return Console(soft_wrap=True)


def run_config(cfg, run_id: str | None, dry_run: bool, console, chatty: bool = False) -> int:
    """Dry-run or run a validated config; Ctrl-C (or SIGTERM) leaves a resumable run. Ray's
    and MLflow's chatter goes to the run folder's logs/ (pipeline.run_logs) unless
    `chatty` (-v); a failure is one line with the log's path, the next command and its exit
    code (pipeline.cli.failures)."""
    import signal

    from pipeline.cli.failures import EXIT_INTERRUPTED, report
    from pipeline.config import ConfigError, dump_config
    from pipeline.dataset import ensure_dataset
    from pipeline.driver.run import run_pipeline
    from pipeline.driver.run_dir import CONFIG_FILE, LOG_DIR, new_run_id, plan_table, run_dir_of
    from pipeline.run_logs import RunLogs
    from pipeline.tracking.secrets import redact_uri

    try:
        run_dir = run_dir_of(cfg, run_id or new_run_id())
    except ConfigError as err:  # an id that cannot name a folder
        console.print(f"[red]config error:[/] {err}", highlight=False)
        return 2
    run_id = run_dir.name
    if dry_run:
        try:
            console.print(plan_table(cfg))
            path = dump_config(cfg, run_dir / "config.resolved.yaml")
            console.print(f"resolved config written to {path}; nothing was run")
            if Path(cfg.data.dataset).is_dir():
                ensure_dataset(cfg, console)
        except ConfigError as err:
            console.print(f"[red]config error:[/] {err}", highlight=False)
            return 2
        return 0
    signal.signal(signal.SIGTERM, interrupt)  # `ray job stop`, kill: like Ctrl-C
    # Ctrl-C even when started with SIGINT ignored (`cmd &` in a script): Python keeps an
    # inherited SIG_IGN, and Ray's phase handler only covers the phases themselves
    signal.signal(signal.SIGINT, interrupt)
    with RunLogs(run_dir / LOG_DIR, chatty) as logs:
        try:
            result = run_pipeline(cfg, run_id, console)
        except KeyboardInterrupt:
            console.print(f"\n[yellow]interrupted[/]: continue with `progan resume {run_dir}`")
            return EXIT_INTERRUPTED
        except Exception as err:
            resumable = (run_dir / CONFIG_FILE).is_file()
            return report(
                console,
                err,
                logs,
                lambda f: next_step_after(f.code, run_dir) if resumable and f.code != 2 else None,
            )
    if all(r["status"] != "trained" for r in result.phases):
        console.print("all phases done earlier: nothing to train")
    console.print(f"\n[bold green]done[/]: run {result.run_id}")
    console.print(f"  run directory : {result.run_dir}")
    console.print(f"  generator     : {result.generator}")
    console.print(f"  MLflow store  : {redact_uri(result.tracking_uri)}")
    console.print(f"  logs          : {logs.folder}")
    console.print(f"  open it with  : progan ui --root {result.run_dir.parent}")
    return 0


def next_step_after(code: int, run_dir: Path) -> str:
    """What to type after a failure of kind `code` (pipeline.cli.failures)."""
    from pipeline.cli.failures import EXIT_CLUSTER, EXIT_TRACKING, EXIT_TRAINING

    resume = f"`progan resume {run_dir}`"
    return {
        EXIT_TRACKING: f"start the MLflow server (or set tracking.uri), then {resume}",
        EXIT_CLUSTER: f"check the cluster (`ray status`) and its address, then {resume}",
        EXIT_TRAINING: f"fix the cause, then {resume} (it continues from the last checkpoint)",
    }.get(code, resume)


def interrupt(signum: int, frame: object) -> None:
    """Signal handler: stop the way Ctrl-C does (`progan run`: runs marked KILLED, resumable)."""
    raise KeyboardInterrupt


def resume(args: argparse.Namespace) -> int:
    """Continue a run directory's own config under its own run id, from any directory.

    The saved config's relative paths were relative to where the run was started; they are
    made absolute against that place (see `pipeline.driver.run_dir.origin_of`).
    """
    from pipeline.config import absolute_paths, load_config_dict, validate_config
    from pipeline.driver.run_dir import CONFIG_FILE, origin_of

    console = console_for_run()
    run_dir = Path(args.run_dir).absolute()
    if not (run_dir / CONFIG_FILE).is_file():
        console.print(f"[red]error:[/] {args.run_dir} is not a run directory (no {CONFIG_FILE})")
        return 2
    try:
        raw = absolute_paths(load_config_dict(run_dir / CONFIG_FILE), origin_of(run_dir))
        raw["run"]["root"] = str(run_dir.parent)
        if args.address:
            raw["ray_address"] = args.address
        cfg = validate_config(raw)
        refuse_masked_uris(cfg)
    except ValueError as err:
        console.print(f"[red]config error:[/] {err}", highlight=False)
        return 2
    return run_config(cfg, run_dir.name, False, console, verbose(args))


def refuse_masked_uris(cfg) -> None:
    """A saved URI whose password was masked (pipeline.tracking.secrets) cannot be used as
    is; the tracking URI gets it back from $MLFLOW_TRACKING_URI, storage and data cannot."""
    from pipeline.config import ConfigError
    from pipeline.tracking.secrets import MASK

    for key, value in (
        ("run.storage_path", cfg.run.storage_path),
        ("data.dataset", cfg.data.dataset),
        ("data.source", cfg.data.source),
    ):
        if value and MASK in str(value):
            raise ConfigError(
                f"{key}: the run was started with a password in this URI, which is never "
                "stored; give the store its credentials through its own environment "
                "variables (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and a URI without"
            )
