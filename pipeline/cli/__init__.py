"""The `progan` command line: one module per verb in this package, each with `register`
(modules without one are the verbs' helpers)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Sequence


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` says each option's default, unless there is none or its text names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        quiet = action.default in (None, False, argparse.SUPPRESS) or not action.option_strings
        if quiet or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


def verbosity() -> argparse.ArgumentParser:
    """`-v/--verbose`, accepted before the verb and after it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # a verb's parser must not reset the top-level's value
        help="also show Ray's and MLflow's own output on the console (always in the logs)",
    )
    return common


def verb_parser(**kwargs: object) -> argparse.ArgumentParser:
    """A verb's parser: defaults shown in its --help, -v accepted."""
    kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
    kwargs.setdefault("parents", [verbosity()])
    return argparse.ArgumentParser(**kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every verb module of this package."""
    parser = argparse.ArgumentParser(
        prog="progan",
        description="Progressive-Growing GAN pipeline: prepare faces, train, track, use.",
        parents=[verbosity()],
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=verb_parser)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):  # a verb (others are helpers, e.g. failures)
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
    passing = args.command == "submit" and getattr(args, "config", None) in ("tune", "prepare")
    stray = [  # `progan submit tune|prepare ...` passes its verb's own options on
        w for w in extra if not passing and (w.startswith("-") or "=" not in w or overrides is None)
    ]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
