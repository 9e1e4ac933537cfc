"""`progan config CONFIG [key=value ...]`: a config's resolved values, each with what it means.

Validates CONFIG with its overrides as `progan run` would (a bad key is one line, exit 2)
and prints every key with its value, its description and its default; `*` marks a value
the config sets to something other than the default. `--changed` prints only those.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `config` subcommand."""
    p = subparsers.add_parser(
        "config",
        help="print a config's resolved values with their descriptions and defaults",
        description="Validate CONFIG (+ overrides) and print every key: value, default, meaning.",
    )
    p.add_argument("config", help="YAML config, e.g. conf/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--changed", action="store_true", help="only keys that differ from default")
    p.set_defaults(func=show)


@dataclass(frozen=True)
class Entry:
    """One key of a config: its value, default and description."""

    key: str
    value: Any
    default: Any
    description: str

    @property
    def changed(self) -> bool:
        return self.value != self.default


def entries(model: Any, prefix: str = "") -> Iterator[Entry]:
    """Every leaf field of a pydantic model, depth first, in declaration order."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from entries(value, f"{key}.")
            continue
        default = field.get_default(call_default_factory=True)
        if default is PydanticUndefined:
            default = "(required)"
        yield Entry(key, plain(value), plain(default), field.description or "")


def plain(value: Any) -> Any:
    """A value as YAML would show it (tuples as lists, models as dicts)."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return list(value)
    return value


def show(args: argparse.Namespace) -> int:
    """Print the resolved config; config errors are one line, exit 2."""
    from rich.console import Console

    from pipeline.config import ConfigError, load_config

    console = Console(soft_wrap=True, highlight=False)
    try:
        cfg = load_config(args.config, list(args.overrides))
    except ConfigError as err:
        console.print(f"[red]config error:[/] {err}", markup=True)
        return 2
    rows = [e for e in entries(cfg) if e.changed or not args.changed]
    width = max((len(e.key) for e in rows), default=0)
    section = None
    for e in rows:
        top = e.key.split(".", 1)[0]
        if top != section and "." in e.key:
            console.print(f"\n{top}:", style="bold", markup=False)
            section = top
        mark = "*" if e.changed else " "
        about = f"  {e.description}" if e.description else ""
        default = f" (default {e.default})" if e.changed else ""
        console.print(f"{mark} {e.key:<{width}} = {e.value}{default}{about}", markup=False)
    console.print(f"\n{sum(e.changed for e in rows)} of the keys differ from the defaults (*)")
    return 0
