"""`progan prepare SOURCE OUT --resolution R`: photos -> aligned faces -> LMDB per resolution."""

from __future__ import annotations

import argparse


def about(option: str) -> str:
    """The help of an option: PrepareConfig's description of the same field (one text for
    the command line and a pipeline config's data.prepare)."""
    from preprocessing.config import PrepareConfig

    return PrepareConfig.model_fields[option].description or ""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `prepare` subcommand."""
    p = subparsers.add_parser(
        "prepare",
        help="detect, align and store faces as one LMDB per resolution",
        description="Turn a folder, zip or list file of photos into a prepared face dataset.",
    )
    p.add_argument("source", help="folder of images, .zip archive, or text file of paths")
    p.add_argument("out", help="output dataset directory")
    p.add_argument("--resolution", type=int, required=True, help="power of two, 4..1024")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="MTCNN actors (default: every CPU; with GPUs, every CPU but one)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPU share of each MTCNN actor, e.g. 0.25 or 1 (default: GPUs/workers, 0 without)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds any one wait may take (listing, actor start, no shard done, merge)",
    )
    p.add_argument(
        "--detector",
        choices=["mtcnn", "none"],
        default="mtcnn",
        help=about("detector"),
    )
    p.add_argument(
        "--crop",
        choices=["align", "box"],
        default="align",
        help=about("crop"),
    )
    p.add_argument("--margin", type=float, default=0.25, help=about("margin"))
    p.add_argument("--min-face-size", type=int, default=32, help=about("min_face_size"))
    p.add_argument("--min-prob", type=float, default=0.9, help=about("min_prob"))
    p.add_argument("--multi-face", action="store_true", help=about("multi_face"))
    p.add_argument(
        "--record-format",
        choices=["raw", "png"],
        default="raw",
        help=about("record_format"),
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=100_000_000,
        help=about("max_image_pixels"),
    )
    p.add_argument("--batch-size", type=int, default=32, help=about("batch_size"))
    p.add_argument("--shard-size", type=int, default=256, help=about("shard_size"))
    p.add_argument("--limit", type=int, default=None, help=about("limit"))
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.add_argument("--force", action="store_true", help="discard an existing/different output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run prepare_dataset and print a summary table; one-line errors for bad input."""
    from rich.console import Console
    from rich.table import Table

    from preprocessing.config import ConfigError
    from preprocessing.prepare import PrepareError, prepare_dataset
    from preprocessing.resources import ResourceError
    from preprocessing.sources import SourceError

    console = Console(stderr=True)
    try:
        summary = prepare_dataset(
            args.source,
            args.out,
            args.resolution,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            timeout_s=args.timeout,
            detector=args.detector,
            force=args.force,
            address=args.address,
            progress=True,
            crop=args.crop,
            margin=args.margin,
            min_face_size=args.min_face_size,
            min_prob=args.min_prob,
            multi_face=args.multi_face,
            record_format=args.record_format,
            max_image_pixels=args.max_image_pixels,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            limit=args.limit,
        )
    except (ConfigError, SourceError, PrepareError, ResourceError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    table = Table(title=f"prepared {summary.out_dir}")
    table.add_column("item")
    table.add_column("value", justify="right")
    state = "already complete, nothing changed" if summary.already_complete else "done"
    table.add_row("status", state)
    table.add_row("inputs", str(summary.inputs))
    table.add_row("records", str(summary.records))
    table.add_row("rejected", str(summary.rejected))
    for reason, count in summary.reject_reasons.items():
        table.add_row(f"  {reason}", str(count))
    for res, count in summary.counts.items():
        table.add_row(f"res-{res:04d}", str(count))
    if summary.resumed_shards:
        table.add_row("shards resumed", str(summary.resumed_shards))
    table.add_row("seconds", f"{summary.elapsed_s:.1f}")
    table.add_row("fingerprint", summary.fingerprint)
    Console().print(table)
    return 0
