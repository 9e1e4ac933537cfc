"""`progan generate CKPT`: a grid PNG of N generated faces and/or one PNG per face.

Image i uses the latent of (seed, i) (see `pipeline.tools.generator.sample_latents`), so the
individual files, named `seed<S>-<iiiii>.png`, are what `progan edit --seed S --with i`
refers to, and `--n 16` gives the first 16 faces of `--n 64`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.tools.args import add_generator_args, positive_int, reports_errors
from pipeline.tools.files import image_name, save_pngs
from pipeline.tools.generator import ToolError, load_generator


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand."""
    p = subparsers.add_parser(
        "generate",
        help="sample faces from a trained generator into a grid and/or PNG files",
        description="Sample N faces (seeded, reproducible) from a checkpoint's EMA generator.",
    )
    add_generator_args(p)
    p.add_argument("--n", type=positive_int, default=64, help="number of images (default 64)")
    p.add_argument("--out", type=Path, default=None, help="grid PNG to write")
    p.add_argument("--nrow", type=positive_int, default=None, help="images per grid row")
    p.add_argument(
        "--individual", type=Path, default=None, metavar="DIR", help="also one PNG per image here"
    )
    p.set_defaults(func=run)


@reports_errors
def run(args: argparse.Namespace) -> int:
    """Render the images once; write the grid and the individual files from the same pixels."""
    from progan.sampling import save_grid, to_uint8

    if args.out is None and args.individual is None:
        raise ToolError("nothing to write: give --out GRID.png and/or --individual DIR")
    gen = load_generator(args.ckpt, args.device, args.tracking_uri)
    print(gen.describe())
    images = gen.render(gen.latents(args.seed, args.n), args.size, args.truncation, args.batch_size)
    if args.out is not None:
        print(f"grid: {save_grid(images, args.out, args.nrow)}")
    if args.individual is not None:
        arrays = to_uint8(images).permute(0, 2, 3, 1).numpy()
        paths = [args.individual / image_name(args.seed, i) for i in range(args.n)]
        save_pngs(arrays, paths)
        print(f"{len(paths)} images: {args.individual}/{image_name(args.seed, 0)} ...")
    return 0
