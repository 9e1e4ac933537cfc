"""Differentiable augmentation of what D sees: DiffAugment's transforms, ADA's adaptive p.

DiffAugment (Zhao et al. 2020, `DiffAugment_pytorch.py`): the same policy for reals and
fakes, each call drawing new random parameters for every image: brightness (+U(-0.5, 0.5)),
saturation (x U(0, 2) around the pixel's channel mean), contrast (x U(0.5, 1.5) around the
image mean), translation (by up to 1/8 of the size, zero fill) and cutout (a zeroed square
of half the size). Every transform is differentiable in the images, so G learns through
it. With a probability p < 1 each transform is applied to each image with probability p
(ADA's scheme, Karras et al. 2020); `AdaptiveProbability` moves p by ADA's rule, on the
device. Randomness comes from the caller's generator (the trainer's seeded one), so a run
stays a pure function of its position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from progan.config import AUGMENT_TRANSFORMS, TrainConfig

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _uniform(x: torch.Tensor, generator: torch.Generator, low: float, high: float) -> torch.Tensor:
    """One U(low, high) per image, shaped [N, 1, 1, 1] in x's dtype."""
    u = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device)
    return (low + (high - low) * u).to(x.dtype)


def _offsets(x: torch.Tensor, generator: torch.Generator, low: int, high: int) -> torch.Tensor:
    """Two integers per image in [low, high) (rows, columns), shaped [2, N, 1]."""
    return torch.randint(low, high, (2, x.shape[0], 1), generator=generator, device=x.device)


def brightness(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Add U(-0.5, 0.5) to every pixel of an image."""
    return x + _uniform(x, generator, -0.5, 0.5)


def saturation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scale each pixel's deviation from its channel mean by U(0, 2)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _uniform(x, generator, 0.0, 2.0) + mean


def contrast(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scale the deviation from the image's mean by U(0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, generator, 0.5, 1.5) + mean


def translation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by integers in [-size/8, size/8] (rows and columns), zero fill."""
    n, _, h, w = x.shape
    shift = _offsets(x, generator, -(h // 8), h // 8 + 1)
    rows = (torch.arange(h, device=x.device) + shift[0] + 1).clamp(0, h + 1)  # [N, H]
    cols = (torch.arange(w, device=x.device) + shift[1] + 1).clamp(0, w + 1)  # [N, W]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Zero a (size/2)-square of each image, its centre anywhere (clipped at the border)."""
    n, _, h, w = x.shape
    ch, cw = h // 2, w // 2
    centre = _offsets(x, generator, 0, h + 1 - ch % 2)  # DiffAugment's offsets (square images)
    rows = torch.arange(h, device=x.device) - (centre[0] - ch // 2)  # [N, H]: 0 at the top
    cols = torch.arange(w, device=x.device) - (centre[1] - cw // 2)  # [N, W]: 0 at the left
    inside = ((rows >= 0) & (rows < ch)).view(n, 1, h, 1) & ((cols >= 0) & (cols < cw)).view(
        n, 1, 1, w
    )
    return x * (~inside).to(x.dtype)


TRANSFORMS: dict[str, tuple[Transform, ...]] = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
}
assert tuple(TRANSFORMS) == AUGMENT_TRANSFORMS


def transforms_of(policy: str) -> list[Transform]:
    """The transforms of a policy ('color,translation,cutout'), in its order."""
    return [f for name in policy.split(",") for f in TRANSFORMS[name.strip()]]


def diff_augment(
    x: torch.Tensor,
    transforms: list[Transform],
    generator: torch.Generator,
    p: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Apply each transform to each image of x [N, C, H, W], with probability p per image.

    p == 1.0 (a Python float) applies every transform to every image, as DiffAugment does;
    otherwise (a float or a device tensor, as ADA's p) each transform is kept for an image
    where a U(0, 1) draw is below p, without reading p on the host.
    """
    always = not isinstance(p, torch.Tensor) and p >= 1.0
    for transform in transforms:
        out = transform(x, generator)
        if always:
            x = out
            continue
        keep = torch.rand(x.shape[0], generator=generator, device=x.device) < p
        x = torch.where(keep.view(-1, 1, 1, 1), out, x)
    return x


class AdaptiveProbability:
    """ADA's p and its overfitting signal r_t = E[sign(D(real))], all on the device.

    `observe` adds a D step's mean sign (all-reduced over DDP ranks, so every rank holds the
    global sums); every `interval` D steps `adjust` moves p by sign(r_t - target) * images
    / (kimg * 1000), clipped to [0, 1], as StyleGAN2-ADA does, and starts a new interval.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, world_size: int = 1) -> None:
        self.target, self.interval, self.kimg = cfg.ada_target, cfg.ada_interval, cfg.ada_kimg
        self.world_size = world_size
        self.p = torch.zeros((), device=device)
        self.signs = torch.zeros(2, dtype=torch.float64, device=device)  # sum of signs, images

    def observe(self, mean_sign: torch.Tensor, images: int) -> None:
        """Add one D step: the mean sign of D on this rank's `images` (augmented) reals."""
        sign = mean_sign.detach().double()
        step = torch.stack([sign, torch.ones_like(sign)]) * images  # no host-to-device copy
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(step)  # no host sync: the collective is queued like any kernel
        self.signs += step

    def step_done(self, d_index: int) -> None:
        """After D step `d_index` of a phase: adjust p at the end of each interval."""
        if (d_index + 1) % self.interval == 0:
            self.adjust()

    def adjust(self) -> None:
        """Move p by ADA's rule from the signs since the last adjustment; reset them."""
        total, images = self.signs[0], self.signs[1].clamp(min=1)
        move = torch.sign(total / images - self.target) * self.signs[1] / (self.kimg * 1000)
        self.p.copy_((self.p + move).clamp(0.0, 1.0))
        self.signs.zero_()

    def state_dict(self) -> dict[str, Any]:
        """p and the signs of the unfinished interval (equal on every rank)."""
        return {"p": self.p.detach().clone(), "signs": self.signs.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`'s p and signs."""
        self.p.copy_(state["p"])
        self.signs.copy_(state["signs"])


class Augmentation:
    """What the trainer applies to D's inputs, per `train.augment` (identity for 'none')."""

    def __init__(self, cfg: TrainConfig, device: torch.device, world_size: int = 1) -> None:
        self.mode = cfg.augment
        self.transforms = transforms_of(cfg.augment_policy)
        self.ada = AdaptiveProbability(cfg, device, world_size) if self.mode == "ada" else None
        self.fixed_p = cfg.augment_p
        # the stat: ADA's p itself, else the fixed p made a device tensor once
        self.p_stat = self.ada.p if self.ada else torch.full((), self.fixed_p, device=device)

    @property
    def enabled(self) -> bool:
        """Whether D's inputs are augmented at all."""
        return self.mode != "none"

    @property
    def p(self) -> float | torch.Tensor:
        """The probability of each transform now (a device tensor under ADA)."""
        return self.ada.p if self.ada is not None else self.fixed_p

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x augmented (a new tensor), or x itself when augmentation is off."""
        if not self.enabled:
            return x
        return diff_augment(x, self.transforms, generator, self.p)

    def stats(self) -> dict[str, torch.Tensor]:
        """The probability as a device-tensor stat (read with the losses at log points)."""
        return {"augment_p": self.p_stat} if self.enabled else {}
