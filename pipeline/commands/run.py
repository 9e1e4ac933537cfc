"""`progan run CONFIG [key=value ...]` and `progan resume RUN_DIR`: the training pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    from rich.console import Console

    from pipeline.config import ConfigError, dump_config, load_config
    from pipeline.run import ensure_dataset, new_run_id, plan_table, run_pipeline
    from progan.schedule import phase_plan

    console = Console(soft_wrap=True)
    try:
        overrides = list(args.overrides) + ([f"ray_address={args.address}"] if args.address else [])
        cfg = load_config(args.config, overrides)
        run_id = args.run_id or new_run_id()
        if args.dry_run:
            plan = phase_plan(cfg.schedule, cfg.model.resolution)
            console.print(plan_table(cfg, plan))
            path = dump_config(cfg, Path(cfg.run.root) / run_id / "config.resolved.yaml")
            console.print(f"resolved config written to {path}; nothing was run")
            if Path(cfg.data.dataset).is_dir():
                ensure_dataset(cfg, plan, console)
            return 0
        result = run_pipeline(cfg, run_id, console)
    except ConfigError as err:
        console.print(f"[red]config error:[/] {err}", highlight=False)
        return 2
    console.print(f"\n[bold green]done[/]: run {result.run_id}")
    console.print(f"  run directory : {result.run_dir}")
    console.print(f"  generator     : {result.generator}")
    console.print(f"  MLflow store  : {result.tracking_uri}")
    console.print(f"  open it with  : progan ui --root {result.run_dir.parent}")
    return 0


def resume(args: argparse.Namespace) -> int:
    """Rerun a run directory's own config under its own run id."""
    run_dir = Path(args.run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        print(f"error: {run_dir} is not a run directory (no config.yaml)")
        return 2
    ns = argparse.Namespace(
        config=str(config),
        overrides=[f"run.root={run_dir.resolve().parent}"],
        run_id=run_dir.name,
        dry_run=False,
        address=args.address,
    )
    return run(ns)
