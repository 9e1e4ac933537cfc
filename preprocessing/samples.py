"""A folder of sample face photos made from public-domain images shipped in installed packages.

Grace Hopper (matplotlib's sample data) and the astronaut Eileen Collins (scikit-image's
data) are augmented — mirror, small rotation, scale and crop with the face kept whole,
brightness/contrast/colour jitter, placement in a bigger canvas — so MTCNN still finds one
face in nearly every photo. Deterministic for a given seed; 300 photos take about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def base_photos() -> list[tuple[Image.Image, tuple[int, int, int, int]]]:
    """The two public-domain photos with their face boxes (x1, y1, x2, y2), from MTCNN."""
    import matplotlib
    from skimage import data

    hopper = Image.open(Path(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    astronaut = Image.fromarray(data.astronaut())
    return [(hopper.convert("RGB"), (174, 120, 356, 340)), (astronaut, (181, 62, 268, 172))]


def _augment(photo: Image.Image, box, rng: np.random.Generator) -> Image.Image:
    x1, y1, x2, y2 = box
    face = max(x2 - x1, y2 - y1)
    side = face * rng.uniform(1.5, 2.1)
    slack = (side - face) / 4
    cx = (x1 + x2) / 2 + rng.uniform(-slack, slack)
    cy = (y1 + y2) / 2 + rng.uniform(-slack, slack)
    crop = photo.crop((round(cx - side / 2), round(cy - side / 2), round(cx + side / 2),
                       round(cy + side / 2)))  # fmt: skip
    if rng.random() < 0.5:
        crop = ImageOps.mirror(crop)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    crop = crop.rotate(rng.uniform(-12, 12), Image.Resampling.BILINEAR, fillcolor=fill)
    size = int(rng.integers(96, 161))
    crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
    crop = ImageEnhance.Contrast(crop).enhance(rng.uniform(0.8, 1.2))
    crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.6, 1.4))
    width, height = (int(v) for v in rng.integers(size + 8, 241, 2))
    canvas = Image.new("RGB", (width, height), fill)
    canvas.paste(
        crop, (int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1)))
    )
    return canvas


def make_sample_faces(out_dir: str | os.PathLike, n: int = 300, seed: int = 0) -> Path:
    """Write n augmented face photos (JPEG, every fifth PNG) into out_dir; return out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = base_photos()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        photo, box = photos[i % len(photos)]
        image = _augment(photo, box, rng)
        if i % 5 == 4:
            image.save(out / f"face_{i:04d}.png", optimize=False)
        else:
            image.save(out / f"face_{i:04d}.jpg", quality=90)
    return out
