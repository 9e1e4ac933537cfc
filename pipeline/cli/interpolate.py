"""`progan interpolate CKPT --out walk.gif|walk.mp4|DIR`: a looping latent walk.

The keyframes are images 0..K-1 of `progan generate --seed S`; the walk goes through them
with `--steps` frames per segment and back to the first (K * steps frames in all), along
great circles (slerp, as in the official interpolation videos) or straight lines (lerp).
GIFs are written with Pillow; MP4 needs PyAV (the `video` extra); any other path without a
suffix becomes a folder of numbered PNG frames.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.tools.args import add_generator_args, positive_int, reports_errors
from pipeline.tools.files import save_pngs
from pipeline.tools.generator import ToolError, load_generator

if TYPE_CHECKING:
    import numpy as np
    import torch

    from pipeline.tools.generator import LoadedGenerator


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `interpolate` subcommand."""
    p = subparsers.add_parser(
        "interpolate",
        help="render a looping walk through random latents as GIF, MP4 or PNG frames",
        description="Interpolate through K seeded keyframe latents and back to the first.",
    )
    add_generator_args(p)
    p.add_argument("--out", type=Path, required=True, help="walk.gif, walk.mp4 or a folder")
    p.add_argument("--steps", type=positive_int, default=16, help="frames per segment")
    p.add_argument("--keyframes", type=int, default=4, help="keyframe latents, >= 2")
    p.add_argument("--fps", type=float, default=24.0, help="frames per second (GIF/MP4)")
    p.add_argument(
        "--method", choices=["slerp", "lerp"], default="slerp", help="path between keyframes"
    )
    p.set_defaults(func=run)


def frame_latents(
    gen: LoadedGenerator, seed: int, keyframes: int, steps: int, method: str
) -> torch.Tensor:
    """The walk's latents: [keyframes * steps, latent], frame k * steps is keyframe k."""
    from progan.sampling import interpolation_path

    if keyframes < 2:
        raise ToolError(f"--keyframes must be at least 2, got {keyframes}")
    keys = gen.latents(seed, keyframes)
    return interpolation_path(keys, steps, spherical=method == "slerp", loop=True)


def write_gif(frames: Iterable[np.ndarray], path: Path, fps: float) -> int:
    """An endlessly looping GIF (Pillow, adaptive palette per frame); returns frame count."""
    from PIL import Image

    images = [Image.fromarray(f.squeeze(-1) if f.shape[-1] == 1 else f) for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(
        path,
        save_all=True,
        append_images=images[1:],
        duration=max(1, round(1000.0 / fps)),
        loop=0,
        optimize=False,
    )
    return len(images)


def require_pyav():
    """The `av` module, or a ToolError saying what to install."""
    try:
        import av
    except ImportError as exc:
        raise ToolError(
            "writing .mp4 needs PyAV, which is not installed: "
            "`pip install 'progan-pipeline[video]'`, or write a .gif or a folder of PNG frames"
        ) from exc
    return av


def write_mp4(frames: Iterator[np.ndarray], path: Path, fps: float) -> int:
    """H.264 MP4 (yuv420p, crf 18) through PyAV; returns the frame count."""
    import numpy as np

    av = require_pyav()
    first = next(frames)
    height, width = first.shape[:2]
    if height % 2 or width % 2:
        raise ToolError(f"MP4 (yuv420p) needs even sides, got {width}x{height}; pass --size")
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(path), mode="w") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in itertools.chain([first], frames):
            rgb = np.repeat(frame, 3, axis=-1) if frame.shape[-1] == 1 else frame
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            container.mux(stream.encode(video_frame))
            count += 1
        container.mux(stream.encode(None))
    return count


@reports_errors
def run(args: argparse.Namespace) -> int:
    """Render the walk frame batch by frame batch and write it where --out says."""
    suffix = args.out.suffix.lower()
    if suffix not in ("", ".gif", ".mp4"):
        raise ToolError(f"--out must end in .gif or .mp4, or be a folder; got {args.out}")
    if args.fps <= 0:
        raise ToolError(f"--fps must be positive, got {args.fps}")
    if suffix == ".mp4":
        require_pyav()  # before any rendering
    gen = load_generator(args.ckpt, args.device, args.tracking_uri)
    print(gen.describe())
    z = frame_latents(gen, args.seed, args.keyframes, args.steps, args.method)
    frames = gen.render_uint8(z, args.size, args.truncation, args.batch_size)
    if suffix == ".gif":
        count = write_gif(frames, args.out, args.fps)
    elif suffix == ".mp4":
        count = write_mp4(frames, args.out, args.fps)
    else:
        count = len(save_pngs(frames, [args.out / f"frame-{i:05d}.png" for i in range(len(z))]))
    print(f"{count} frames ({args.keyframes} keyframes x {args.steps} steps): {args.out}")
    return 0
