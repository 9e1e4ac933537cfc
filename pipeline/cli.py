"""The `progan` command line: discovers subcommands in `pipeline.commands`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from pipeline import commands


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand found in `pipeline.commands`."""
    parser = argparse.ArgumentParser(
        prog="progan",
        description="Progressive-Growing GAN pipeline: prepare faces, train, track, use.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
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


if __name__ == "__main__":
    sys.exit(main())
