"""`progan evaluate CKPT --data DATASET`: SWD / MS-SSIM / FID / KID of a checkpoint's EMA
generator against a prepared dataset, at the resolution where training stopped."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.tools.args import add_generator_args, positive_int, reports_errors
from pipeline.tools.generator import ToolError, load_generator
from progan.metrics.catalogue import METRIC_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `evaluate` subcommand."""
    p = subparsers.add_parser(
        "evaluate",
        help="SWD, MS-SSIM, FID/KID of a checkpoint against a prepared dataset",
        description="Evaluate a checkpoint's EMA generator (see docs/metrics.md).",
    )
    add_generator_args(p, sampling=False)
    p.add_argument(
        "--data",
        required=True,
        help="prepared dataset (progan prepare): a folder, or a URI in object storage (its "
        "resolution is staged into $PROGAN_CACHE_DIR first)",
    )
    p.add_argument(
        "--metrics",
        default="swd,msssim",
        help=f"comma-separated, any of {', '.join(METRIC_NAMES)} ",
    )
    p.add_argument("--num-images", type=positive_int, default=10_000, help="per side")
    p.add_argument("--fid-weights", default=None, help="pt_inception-2015-12-05 weights file")
    p.add_argument("--seed", type=int, default=0, help="seed of the real subset and latents")
    p.add_argument("--cache", type=Path, default=None, help="real-statistics cache directory")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.set_defaults(func=run)


@reports_errors
def run(args: argparse.Namespace) -> int:
    """Load, evaluate, print a table (and write JSON)."""
    from rich.console import Console
    from rich.table import Table

    from pipeline.evaluation import EvaluationError, evaluate_generator
    from preprocessing.object_store import display
    from preprocessing.staging import stage

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    gen = load_generator(args.ckpt, args.device, args.tracking_uri)
    try:
        data = stage(args.data, [gen.resolution])  # a folder as it is; a URI staged
    except (OSError, RuntimeError) as err:  # not there, unreachable, StagingError
        raise ToolError(f"--data {display(args.data)}: {err}") from err
    if not (data / "manifest.json").is_file():
        raise ToolError(
            f"--data {args.data} is not a prepared dataset (no manifest.json); make one with "
            f"`progan prepare {args.data} PREPARED --resolution {gen.resolution}` and pass "
            "PREPARED (with the --detector and --crop the training data had)"
        )
    try:
        results = evaluate_generator(
            gen.module,
            gen.level,
            gen.alpha,
            data,
            gen.resolution,
            metrics=metrics,
            num_images=args.num_images,
            fid_weights=args.fid_weights,
            device=args.device,
            seed=args.seed,
            cache_dir=args.cache,
            latent_size=gen.latent_size,
        )
    except (EvaluationError, ValueError) as err:
        raise ToolError(str(err)) from err
    table = Table(title=f"{gen.source} at {gen.resolution}x{gen.resolution} vs {args.data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4g}")
    console = Console()
    console.print(table)
    skipped = [
        m
        for m in metrics
        if m in ("swd", "msssim") and not any(k.lower().startswith(m) for k in results)
    ]
    if skipped:
        console.print(
            f"not measured at {gen.resolution}x{gen.resolution}: {skipped} "
            f"(SWD needs >= 8x8, MS-SSIM >= 16x16)"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"checkpoint": str(gen.source), **results}, indent=2))
    return 0
