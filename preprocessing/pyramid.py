"""Resolution pyramid: each level is the one above averaged over 2x2 blocks, down to 4x4.

This is exactly what average pooling in the network does to real images (rounded to the
nearest integer, halves up), so lower-resolution training data matches the downsampled
high-resolution data the discriminator sees during a fade-in.
"""

from __future__ import annotations

import numpy as np

MIN_RESOLUTION = 4


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 box filter of an HxWxC uint8 array with even H and W."""
    h, w, c = image.shape
    blocks = image.reshape(h // 2, 2, w // 2, 2, c).astype(np.uint16)
    return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def resolutions_down_to_4(resolution: int) -> list[int]:
    """[4, 8, ..., resolution] for a power-of-two resolution >= 4."""
    out = []
    r = resolution
    while r >= MIN_RESOLUTION:
        out.append(r)
        r //= 2
    return sorted(out)


def build_pyramid(image: np.ndarray) -> dict[int, np.ndarray]:
    """{resolution: HxWx3 uint8} from a square power-of-two image down to 4x4."""
    levels = {image.shape[0]: image}
    while image.shape[0] > MIN_RESOLUTION:
        image = halve(image)
        levels[image.shape[0]] = image
    return levels
