"""Using a generator: fixed latents, image grids, interpolation, latent-direction editing.

Images come out of the generator in [-1, 1]; `to_unit` maps them to [0, 1] for saving.
Any output size can be asked for (e.g. 218x178, CelebA's aspect): images are resized with
antialiased bilinear interpolation after generation.

Truncation: the ProGAN generator pixel-normalises z before anything else, so scaling z
(`truncate`) changes nothing for it. `truncation` instead scales the output of the
generator's first linear map of the (normalised) latent, which has no bias and whose mean
over the latent distribution is exactly 0: the same "pull toward the average" that the
truncation trick means, applied where the network can see it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid, save_image

from progan.dcgan import DCGANGenerator
from progan.networks import Alpha, Generator


def fixed_latents(n: int, latent_size: int, seed: int = 0) -> torch.Tensor:
    """n latents from N(0, I), identical on every machine and device for a given seed."""
    return torch.randn(n, latent_size, generator=torch.Generator().manual_seed(seed))


def indexed_latents(seed: int, indices: Iterable[int], latent_size: int) -> torch.Tensor:
    """Latents from N(0, I) where row k depends only on (seed, indices[k]), not on the count.

    Image i of a sheet made with a seed is the same whether 16 or 64 images are drawn, so
    tools can refer to it by (seed, index) alone. Each index gets its own generator seeded
    from numpy's SeedSequence([seed, index]) (no collisions between nearby seeds).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rows = []
    for index in indices:
        if index < 0:
            raise ValueError(f"latent index must be >= 0, got {index}")
        state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
        rows.append(torch.randn(latent_size, generator=torch.Generator().manual_seed(int(state))))
    if not rows:
        return torch.empty(0, latent_size)
    return torch.stack(rows)


def truncate(z: torch.Tensor, psi: float) -> torch.Tensor:
    """Scale z toward the mean latent (0): psi=1 leaves z unchanged.

    Only meaningful for a generator that does not normalise z (DCGAN). The ProGAN generator
    pixel-normalises z first, which undoes this scaling; use `truncation` for it.
    """
    return z * psi


class FixedLevelGenerator(nn.Module):
    """z [N, latent] -> images [N, C, R, R] in [-1, 1] with level and alpha fixed (for export)."""

    def __init__(self, generator: nn.Module, level: int | None, alpha: float = 1.0) -> None:
        super().__init__()
        self.generator = generator
        self.level = level
        self.alpha = alpha

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Render at the fixed level/alpha and clamp to [-1, 1]."""
        return self.generator(z, self.level, self.alpha).clamp(-1.0, 1.0)


def latent_projection(generator: nn.Module) -> nn.Module:
    """The generator's first linear, bias-free map of the latent (what `truncation` scales)."""
    if isinstance(generator, Generator):
        return generator.base.dense  # applied to pixel_norm(z); bias added after it
    if isinstance(generator, DCGANGenerator):
        return generator.net[0]  # ConvTranspose2d(latent -> 4x4), bias=False
    raise TypeError(f"no truncation point known for {type(generator).__name__}")


@contextmanager
def truncation(generator: nn.Module, psi: float) -> Iterator[nn.Module]:
    """Within the block, `generator` runs with the truncation trick at strength psi.

    The output of `latent_projection` (mean 0 over z ~ N(0, I), by symmetry) is multiplied
    by psi: psi=1 is the plain generator, psi=0 gives every latent the same, average image,
    values in between trade variety for typicality. For DCGAN this equals `truncate(z, psi)`.
    """
    if psi == 1.0:
        yield generator
        return
    handle = latent_projection(generator).register_forward_hook(lambda _m, _i, out: out * psi)
    try:
        yield generator
    finally:
        handle.remove()


@torch.no_grad()
def generate(
    generator: nn.Module,
    z: torch.Tensor,
    level: int | None = None,
    alpha: Alpha = 1.0,
    batch_size: int = 64,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] for latents `z`, in batches, optionally resized to size=(H, W)."""
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    try:
        out = [
            generator(chunk.to(device), level, alpha).float().cpu() for chunk in z.split(batch_size)
        ]
    finally:
        generator.train(was_training)
    images = torch.cat(out)
    return resize(images, size) if size is not None else images


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a batch to (H, W) with antialiased bilinear interpolation."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return images.add(1.0).div(2.0).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return to_unit(images).mul(255.0).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """A [C, H, W] grid in [0, 1] of images in [-1, 1] (torchvision's make_grid)."""
    nrow = nrow or max(1, round(images.shape[0] ** 0.5))
    return make_grid(to_unit(images), nrow=nrow, padding=padding)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images in [-1, 1] as one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(images, nrow), path)
    return path


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Linear interpolation between latents."""
    return torch.lerp(z0, z1, t)


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation along the great circle between z0 and z1 (per row).

    Falls back to lerp where the two are (nearly) parallel.
    """
    t = torch.as_tensor(t, dtype=z0.dtype, device=z0.device)
    u0, u1 = F.normalize(z0, dim=-1), F.normalize(z1, dim=-1)
    dot = (u0 * u1).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    so = torch.sin(omega)
    safe = so.abs() > 1e-6
    so_safe = torch.where(safe, so, torch.ones_like(so))
    w0 = torch.sin((1.0 - t) * omega) / so_safe
    w1 = torch.sin(t * omega) / so_safe
    out = w0 * z0 + w1 * z1
    return torch.where(safe, out, torch.lerp(z0, z1, t))


def interpolation_path(
    keys: torch.Tensor, steps: int, spherical: bool = True, loop: bool = False
) -> torch.Tensor:
    """Latents walking through `keys` ([K, D]) with `steps` frames per segment."""
    if keys.shape[0] < 2:
        raise ValueError("interpolation needs at least two key latents")
    if loop:
        keys = torch.cat([keys, keys[:1]])
    fn = slerp if spherical else lerp
    ts = torch.linspace(0.0, 1.0, steps + 1)[:-1].unsqueeze(1)
    frames = [fn(a.expand(steps, -1), b.expand(steps, -1), ts) for a, b in itertools.pairwise(keys)]
    if not loop:
        frames.append(keys[-1:])
    return torch.cat(frames)


def latent_direction(latents: torch.Tensor, without: torch.Tensor | None = None) -> torch.Tensor:
    """Seed 003's attribute direction: the normalised mean of latents that show it.

    With `without` (latents that lack the attribute), the direction is the normalised
    difference of the two normalised means, which cancels what both groups share.
    """
    for name, batch in (("latents", latents), ("without", without)):
        if batch is not None and (batch.ndim != 2 or batch.shape[0] == 0):
            raise ValueError(f"latent_direction needs a non-empty [N, D] batch of {name}")
    direction = F.normalize(latents.mean(dim=0), dim=0)
    if without is not None:
        direction = F.normalize(direction - F.normalize(without.mean(dim=0), dim=0), dim=0)
    return direction


def edit_latents(
    z: torch.Tensor, direction: torch.Tensor, amounts: Sequence[float]
) -> torch.Tensor:
    """For each latent, one copy per amount: z + amount * direction (negative removes it).

    Returns [len(z) * len(amounts), D], latent-major, so a grid with nrow=len(amounts)
    shows one row per latent.
    """
    a = torch.as_tensor(list(amounts), dtype=z.dtype).view(1, -1, 1)
    return (z.unsqueeze(1) + a * direction.view(1, 1, -1)).reshape(-1, z.shape[1])
