"""MS-SSIM diversity (Odena et al. 2017, used in the ProGAN paper): the mean multi-scale SSIM
over random pairs of images; lower means more diverse. Computed with torchmetrics.

Images are compared as pixel values 0..255 (``data_range=255``, see `progan.metrics.images`),
Gaussian window 11x11 with sigma 1.5, negative per-scale values clipped to 0 ("relu"), like
the official ProGAN ``ms_ssim.py``.

Small images: torchmetrics refuses ``n`` scales unless ``H >= 2**n`` and
``H // max(1, n - 1)**2 > 10`` (kernel 11). Instead of shrinking the window, we keep the
window and use the largest number of scales ``n <= 5`` it accepts, with the first ``n`` paper
weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) renormalised to sum to 1: 5 scales from
176x176 up (256, 512, 1024: the paper's setting exactly), 4 at 128, 3 at 64, 2 at 16 and 32.
Values at different resolutions are therefore not comparable with each other, nor (below
176) with published 5-scale numbers. Below 16x16 a ValueError says so.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from progan.metrics.images import to_pixels

PAPER_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_KERNEL = 11
_SIGMA = 1.5


def msssim_betas(resolution: int) -> tuple[float, ...]:
    """Per-scale weights used at ``resolution`` (see the module docstring)."""
    for n in range(len(PAPER_BETAS), 0, -1):
        if resolution >= 2**n and resolution // max(1, n - 1) ** 2 > _KERNEL - 1:
            if n == len(PAPER_BETAS):
                return PAPER_BETAS
            total = sum(PAPER_BETAS[:n])
            return tuple(b / total for b in PAPER_BETAS[:n])
    raise ValueError(
        f"MS-SSIM with an {_KERNEL}x{_KERNEL} window needs images of at least 16x16, "
        f"got {resolution}x{resolution}"
    )


@torch.no_grad()
def ms_ssim(a: Tensor, b: Tensor) -> Tensor:
    """Per-pair MS-SSIM ``[N]`` between image batches ``a`` and ``b`` (same shape)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    betas = msssim_betas(min(a.shape[-2:]))
    return multiscale_structural_similarity_index_measure(
        to_pixels(a),
        to_pixels(b),
        gaussian_kernel=True,
        sigma=_SIGMA,
        kernel_size=_KERNEL,
        reduction="none",
        data_range=255.0,
        betas=betas,
        normalize="relu",
    )


class MSSSIMDiversity:
    """Streaming MS-SSIM over pairs of consecutive images (0-1, 2-3, ...), as the official
    metric pairs them; feed batches of independent random samples with `update`. An odd
    image left at the end of a batch is paired with the first image of the next batch."""

    def __init__(self) -> None:
        self._values: list[Tensor] = []
        self._leftover: Tensor | None = None

    def update(self, images: Tensor) -> None:
        """Add the pairs of a batch of images."""
        if self._leftover is not None:
            images = torch.cat([self._leftover, images.to(self._leftover.device)])
            self._leftover = None
        n = images.shape[0] - images.shape[0] % 2
        if n < images.shape[0]:
            self._leftover = images[n:]
        if n:
            self._values.append(ms_ssim(images[0:n:2], images[1:n:2]).double().cpu())

    @property
    def n_pairs(self) -> int:
        """Number of pairs scored so far."""
        return sum(v.numel() for v in self._values)

    def compute(self) -> dict[str, float]:
        """``{"mean", "std", "n_pairs"}`` over all pairs seen."""
        if not self._values:
            raise ValueError("no pairs were added")
        values = torch.cat(self._values)
        std = values.std().item() if values.numel() > 1 else 0.0
        return {"mean": values.mean().item(), "std": std, "n_pairs": float(values.numel())}
