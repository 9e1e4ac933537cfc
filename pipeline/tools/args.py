"""The generator tools' command-line pieces: argument types, the shared arguments, and the
wrapper that prints a `ToolError` as one line with exit code 2."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from pipeline.tools.generator import ToolError

MAX_SIDE = 8192


def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (as ffmpeg/ImageMagick write it, e.g. 178x218) -> (height, width)."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 178x218, got {text!r}")
    width, height = int(parts[0]), int(parts[1])
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise argparse.ArgumentTypeError(f"size sides must be in 1..{MAX_SIDE}, got {text!r}")
    return height, width


def parse_int_list(text: str) -> list[int]:
    """'3,17,22' -> [3, 17, 22] (non-negative)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parse_float_list(text: str) -> list[float]:
    """'-2,-1,0,1,2' -> [-2.0, -1.0, 0.0, 1.0, 2.0]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_generator_args(parser: argparse.ArgumentParser, *, sampling: bool = True) -> None:
    """CKPT and --device; with sampling, also --seed, --size, --truncation, --batch-size."""
    parser.add_argument(
        "ckpt",
        help="generator.pt, a training checkpoint, a run directory, or a registered model: "
        "models:/NAME/VERSION or models:/NAME@ALIAS",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow holding models:/ (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)",
    )
    if not sampling:
        return
    parser.add_argument("--seed", type=seed_int, default=0, help="latent seed (default 0)")
    parser.add_argument(
        "--size", type=parse_size, default=None, help="output WIDTHxHEIGHT, e.g. 178x218"
    )
    parser.add_argument(
        "--truncation",
        type=float,
        default=1.0,
        metavar="PSI",
        help="truncation trick: 1 = off (default), 0 = the average image; 0.7 is typical",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=32, help="images generated at once"
    )


def reports_errors(func: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Wrap a command's `run`: a ToolError becomes 'error: ...' on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ToolError as exc:
            message = " ".join(str(exc).split())  # one line, whatever the message held
            print(f"error: {message}", file=sys.stderr)
            return 2

    return wrapper
