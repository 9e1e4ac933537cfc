"""`progan edit CKPT`: add or remove an attribute along a latent direction (seed 003's method).

Pick faces that show an attribute on a sheet from `progan generate --seed S` (by index, as
in the `seed<S>-<iiiii>.png` names) with `--with`; the direction is their normalised mean
latent. With `--without` (faces that lack it) it is the normalised difference of the two
normalised means. Or read latents (or a saved direction) from `--direction-from`. Each
target latent z becomes z + s * direction for every strength s: one grid row per target,
one column per strength. The direction has unit length and z ~ N(0, I), so a strength is in
standard deviations of the prior along the direction.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tools.args import (
    add_generator_args,
    parse_float_list,
    parse_int_list,
    positive_int,
    reports_errors,
)
from pipeline.tools.files import load_latent_file, save_tensor_file
from pipeline.tools.generator import LoadedGenerator, ToolError, load_generator

if TYPE_CHECKING:
    import torch

NEGATIVE_LIST = re.compile(r"^-\.?\d[\d.,eE+-]*$")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `edit` subcommand."""
    p = subparsers.add_parser(
        "edit",
        help="move faces along a latent direction made from chosen examples",
        description="Latent-direction editing: rows are targets, columns are strengths.",
    )
    add_generator_args(p)
    p.add_argument("--out", type=Path, required=True, help="grid PNG to write")
    p.add_argument(
        "--n", type=positive_int, default=None, help="size of the sheet the indices refer to"
    )
    p.add_argument(
        "--with",
        dest="with_",
        type=parse_int_list,
        default=None,
        metavar="I,J,...",
        help="sheet indices that have the attribute",
    )
    p.add_argument(
        "--without",
        type=parse_int_list,
        default=None,
        metavar="I,J,...",
        help="sheet indices that lack it",
    )
    p.add_argument(
        "--direction-from",
        type=Path,
        default=None,
        metavar="FILE",
        help=".pt/.npy of latents [N, latent] (or one direction [latent]) instead of --with",
    )
    p.add_argument(
        "--save-direction", type=Path, default=None, metavar="FILE", help="write it (.pt)"
    )
    p.add_argument(
        "--targets",
        type=parse_int_list,
        default=None,
        help="sheet indices to edit (default: the first 4 not in --with/--without)",
    )
    p.add_argument(
        "--strengths",
        type=parse_float_list,
        default=[-2.0, -1.0, 0.0, 1.0, 2.0],
        help="steps along the direction, one column each",
    )
    # argparse takes "-2,-1,0" for an option; let this parser read such lists as values
    # (harmless if a future argparse drops the attribute: then write --strengths=-2,-1,0).
    p._negative_number_matcher = NEGATIVE_LIST
    p.set_defaults(func=run)


def check_indices(args: argparse.Namespace) -> None:
    """Refuse indices beyond --n, and a direction given twice or not at all."""
    if (args.with_ is None) == (args.direction_from is None):
        raise ToolError("give exactly one of --with I,J,... or --direction-from FILE")
    if args.n is None:
        return
    named = (("--with", args.with_), ("--without", args.without), ("--targets", args.targets))
    for flag, indices in named:
        bad = [i for i in indices or [] if i >= args.n]
        if bad:
            raise ToolError(f"{flag} index {bad[0]} is not on a sheet of --n {args.n}")


def default_targets(args: argparse.Namespace, count: int = 4) -> list[int]:
    """The first `count` sheet indices that are not examples."""
    used = set(args.with_ or []) | set(args.without or [])
    return [i for i in range(count + len(used)) if i not in used][:count]


def direction_for(args: argparse.Namespace, gen: LoadedGenerator) -> torch.Tensor:
    """The unit direction from --with/--without latents or from --direction-from."""
    from progan.sampling import latent_direction

    if args.direction_from is not None:
        chosen = load_latent_file(args.direction_from)
        if chosen.shape[-1] != gen.latent_size or chosen.ndim > 2:
            raise ToolError(
                f"{args.direction_from} holds shape {tuple(chosen.shape)}; expected "
                f"[N, {gen.latent_size}] latents or one [{gen.latent_size}] direction"
            )
        chosen = chosen.reshape(-1, gen.latent_size)
    else:
        chosen = gen.latents(args.seed, args.with_)
    without = gen.latents(args.seed, args.without) if args.without else None
    try:
        return latent_direction(chosen, without)
    except ValueError as exc:
        raise ToolError(str(exc)) from exc


@reports_errors
def run(args: argparse.Namespace) -> int:
    """Build the direction, render targets x strengths, write the grid (and the direction)."""
    from progan.sampling import edit_latents, save_grid

    check_indices(args)
    gen = load_generator(args.ckpt, args.device, args.tracking_uri)
    print(gen.describe())
    direction = direction_for(args, gen)
    if args.with_:
        along = gen.latents(args.seed, args.with_) @ direction
        print(f"--with latents sit at {along.mean():+.2f} along the direction (prior: 0 +- 1)")
    if args.save_direction is not None:
        print(f"direction: {save_tensor_file(direction, args.save_direction)}")
    targets = args.targets if args.targets is not None else default_targets(args)
    z = edit_latents(gen.latents(args.seed, targets), direction, args.strengths)
    images = gen.render(z, args.size, args.truncation, args.batch_size)
    path = save_grid(images, args.out, nrow=len(args.strengths))
    print(f"grid: {path} (rows: targets {targets}; columns: strengths {args.strengths})")
    return 0
