"""The `progan` command line: one module per verb in this package, each with `register`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every verb module of this package."""
    parser = argparse.ArgumentParser(
        prog="progan",
        description="Progressive-Growing GAN pipeline: prepare faces, train, track, use.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `progan` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a nargs="*" positional at the first option, so that
    # `progan run conf.yaml --dry-run train.loss=wgan` would refuse the override: take
    # key=value words that come after options as overrides too
    overrides = getattr(args, "overrides", None)
    stray = [w for w in extra if w.startswith("-") or "=" not in w or overrides is None]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
