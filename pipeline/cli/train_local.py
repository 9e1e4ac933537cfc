"""`progan train-local CONFIG [key=value ...]`: the phase plan in one process, no Ray/MLflow."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train-local` subcommand."""
    p = subparsers.add_parser(
        "train-local",
        help="train progressively in this process (no Ray, no MLflow), e.g. on a bare GPU host",
        description="Run every phase of CONFIG's plan in one process, with the same loop as "
        "`progan run`. Rerunning with the same --out continues from the last checkpoint.",
    )
    p.add_argument("config", help="YAML config, e.g. conf/celeba-64-quick.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--out", default=None, help="output folder (default: <run.root>/local-<name>)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if any")
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="stop training after this many minutes (evaluations not counted); rerun continues",
    )
    p.add_argument(
        "--final-eval-only",
        action="store_true",
        help="evaluate (cfg.eval) only at the end, not at every phase end",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config, train, print where the results are; config errors exit 2."""
    from rich.console import Console

    from pipeline.cli.failures import EXIT_INTERRUPTED, report, verbose
    from pipeline.config import ConfigError, load_config
    from pipeline.driver.run_dir import LOG_DIR
    from pipeline.phases.local import train_local
    from pipeline.run_logs import RunLogs

    console = Console(soft_wrap=True)
    try:
        cfg = load_config(args.config, list(args.overrides))
    except ConfigError as err:
        console.print(f"[red]config error:[/] {err}", highlight=False)
        return 2
    out = Path(args.out or Path(cfg.run.root) / f"local-{Path(args.config).stem}")
    again = f"`progan train-local {args.config} --out {out}` again (it continues)"
    with RunLogs(out / LOG_DIR, verbose(args), ray=False) as logs:
        try:
            result = train_local(
                cfg,
                out,
                device=args.device,
                time_budget_min=args.time_budget_min,
                console=console,
                eval_every_phase=not args.final_eval_only,
            )
        except KeyboardInterrupt:
            console.print(f"\n[yellow]interrupted[/]: continue with {again}", highlight=False)
            return EXIT_INTERRUPTED
        except Exception as err:
            return report(console, err, logs, lambda f: None if f.code == 2 else again)
    s = result.summary
    state = "complete" if s["complete"] else f"stopped at {s['images_shown']} images"
    console.print(f"\n[bold green]done[/] ({state})", highlight=False)
    console.print(f"  output     : {result.out}", highlight=False)
    console.print(f"  generator  : {result.generator}", highlight=False)
    console.print(
        f"  training   : {s['train_seconds']:.0f} s for {s['images_shown']} images "
        f"({s['images_per_s']:.0f} img/s); evaluation {s['eval_seconds']:.0f} s",
        highlight=False,
    )
    metrics = s["final_metrics"]
    if "SWDx1e3_avg" in metrics:
        console.print(
            f"  SWD x1e3   : {metrics['SWDx1e3_avg']:.2f} "
            f"(real floor {metrics['SWDx1e3_avg_real_floor']:.2f})",
            highlight=False,
        )
    if "msssim_fake" in metrics:
        console.print(
            f"  MS-SSIM    : {metrics['msssim_fake']:.3f} (real {metrics['msssim_real']:.3f})",
            highlight=False,
        )
    return 0
