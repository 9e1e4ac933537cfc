"""Image conventions shared by the metrics: every metric sees pixel values in [0, 255].

Two input formats are accepted everywhere in `progan.metrics`:

* ``torch.uint8`` tensors ``[N, 3, H, W]`` with values 0..255 (real images from the LMDBs);
* floating tensors ``[N, 3, H, W]`` in the generator's range [-1, 1]. They are mapped with
  ``(x + 1) * 127.5``, rounded and clamped to [0, 255], i.e. exactly what saving the image as
  an 8-bit PNG would keep (the official ProGAN metrics also quantise fakes to uint8), so real
  and generated images go through the same quantisation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_pixels(images: Tensor) -> Tensor:
    """Return ``images`` as float32 pixel values in [0, 255] (see the module docstring)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped [N, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float()
    if images.is_floating_point():
        return ((images.float() + 1.0) * 127.5).round_().clamp_(0.0, 255.0)
    raise TypeError(
        f"images must be uint8 (0..255) or floating point in [-1, 1], got {images.dtype}"
    )
