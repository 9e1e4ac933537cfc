"""`progan tune SPEC [key=value ...]` and `progan tune --resume SWEEP_DIR`: Ray Tune sweeps."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tune` subcommand."""
    p = subparsers.add_parser(
        "tune",
        help="hyperparameter search: short progressive trainings, ASHA, MLflow (docs/tune.md)",
        description="Run a Ray Tune sweep from a tune spec (conf/tune/*.yaml), or continue one. "
        "Overrides apply to the spec: search.num_samples=8, trial.model.resolution=16, "
        "'search_space.train.loss={choice: [bce, lsgan]}'.",
    )
    p.add_argument("spec", nargs="?", help="tune spec, e.g. conf/tune/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the spec")
    p.add_argument("--name", default=None, help="sweep name (default: spec name or stem + time)")
    p.add_argument(
        "--resume",
        metavar="SWEEP_DIR",
        default=None,
        help="continue this sweep (a directory, or a name under runs/tune)",
    )
    p.add_argument(
        "--retry-errored", action="store_true", help="with --resume: run errored trials again"
    )
    p.add_argument("--dry-run", action="store_true", help="validate and show the plan only")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate (one line per problem, exit 2), then run or resume the sweep."""
    from rich.console import Console
    from rich.markup import escape

    from pipeline.cli.failures import report, verbose
    from pipeline.config import ConfigError
    from pipeline.driver.run_dir import LOG_DIR
    from pipeline.run_logs import RunLogs
    from pipeline.search import sweep as tune
    from pipeline.tracking.secrets import redact_uri

    console = Console(soft_wrap=True)
    try:
        if args.resume:
            if args.spec or args.overrides:
                raise ConfigError("--resume takes the sweep directory only (no spec, overrides)")
            folder = Path(args.resume)
        else:
            if not args.spec:
                raise ConfigError("a tune spec (conf/tune/NAME.yaml) or --resume DIR is needed")
            sweep = tune.load_sweep(args.spec, args.overrides, name=args.name)
            if args.dry_run:
                console.print(escape(tune.dry_run_text(sweep)), highlight=False)
                return 0
            folder = sweep.sweep_dir
    except ConfigError as err:
        console.print(f"[red]config error:[/] {escape(str(err))}", highlight=False)
        return 2
    logs = RunLogs(folder / LOG_DIR, verbose(args)) if folder.is_dir() or not args.resume else None
    with logs or contextlib.nullcontext():
        try:
            if args.resume:
                result = tune.resume_sweep(
                    args.resume, args.address, console, retry_errored=args.retry_errored
                )
            else:
                result = tune.start_sweep(sweep, args.address, console, verbose(args))
        except ConfigError as err:
            console.print(f"[red]config error:[/] {escape(str(err))}", highlight=False)
            return 2
        except tune.SweepInterrupted as err:
            console.print(f"[yellow]{escape(str(err))}[/]", highlight=False)
            return 130
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]: continue with `progan tune --resume {folder}`")
            return 130
        except Exception as err:
            return report(console, err, logs, lambda _: f"`progan tune --resume {folder}`")
    console.print(f"\n[bold green]sweep done[/] in {result.wall_s:.0f} s: {result.sweep_dir}")
    if result.best_config:
        console.print(f"  best config   : {result.best_config}")
        console.print(f"  train it with : progan run {result.best_config}")
    else:
        console.print("  no trial reported the metric: no best config")
    console.print(f"  summary       : {result.sweep_dir / 'summary.md'}")
    uri = redact_uri(result.tracking_uri)
    console.print(f"  MLflow store  : {uri} (sweep run {result.mlflow_run_id})")
    return 0
