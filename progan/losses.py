"""GAN losses: WGAN-GP + drift (default), plain WGAN, logistic/BCE, LSGAN; gradient penalty.

All functions take raw discriminator scores (shape [N]) and return per-sample losses; the
caller takes the mean. 'logistic' and 'bce' are the same loss (BCE on logits, the
non-saturating generator loss); 'bce' accepts soft targets for label noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from progan.config import TrainConfig

WGAN_LOSSES = ("wgan-gp", "wgan")
BCE_LOSSES = ("logistic", "bce")


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    mix: torch.Tensor,
    target: float = 1.0,
) -> torch.Tensor:
    """WGAN-GP's ((||grad D(x_hat)|| - target) / target)^2 per sample.

    x_hat = lerp(real, fake, mix) with one mixing factor per sample.

    Computed out of place with autograd.grad(create_graph=True) so that one backward of
    the total loss trains D through the penalty: correct under DDP, which only reduces
    gradients in `.backward()`.
    """
    x_hat = torch.lerp(real.detach(), fake.detach(), mix.view(-1, 1, 1, 1).to(real.dtype))
    x_hat.requires_grad_(True)
    scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.float().sum(), x_hat, create_graph=True)
    norm = grad.float().flatten(1).norm(2, dim=1)
    return (norm - target).square() / target**2


def discriminator_loss(
    cfg: TrainConfig,
    d_real: torch.Tensor,
    d_fake: torch.Tensor,
    real_target: torch.Tensor | None = None,
    fake_target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample D loss without the gradient penalty (added by the caller for wgan-gp)."""
    d_real, d_fake = d_real.float(), d_fake.float()
    if cfg.loss in WGAN_LOSSES:
        return d_fake - d_real + cfg.drift * d_real.square()
    if cfg.loss in BCE_LOSSES:
        rt = torch.ones_like(d_real) if real_target is None else real_target
        ft = torch.zeros_like(d_fake) if fake_target is None else fake_target
        return F.binary_cross_entropy_with_logits(
            d_real, rt, reduction="none"
        ) + F.binary_cross_entropy_with_logits(d_fake, ft, reduction="none")
    if cfg.loss == "lsgan":
        return (d_real - 1).square() + d_fake.square()
    raise ValueError(f"unknown loss {cfg.loss!r}")


def generator_loss(cfg: TrainConfig, d_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample G loss: -D (WGAN), softplus(-D) (non-saturating), (D - 1)^2 (LSGAN)."""
    d_fake = d_fake.float()
    if cfg.loss in WGAN_LOSSES:
        return -d_fake
    if cfg.loss in BCE_LOSSES:
        return F.softplus(-d_fake)
    if cfg.loss == "lsgan":
        return (d_fake - 1).square()
    raise ValueError(f"unknown loss {cfg.loss!r}")
