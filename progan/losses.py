"""GAN losses: WGAN-GP + drift (default), plain WGAN, logistic/BCE, LSGAN; GP and R1.

All loss functions take raw discriminator scores (shape [N]) and return per-sample losses;
the caller takes the mean. 'logistic' and 'bce' are the same loss (BCE on logits, the
non-saturating generator loss); 'bce' accepts soft targets for label noise.
`DiscriminatorObjective` is D's whole loss (with the GP and lazy R1) as one module forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from progan.config import TrainConfig
from progan.networks import Alpha, GrowingNetwork

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
    norm = input_gradients(critic(x_hat), x_hat).norm(2, dim=1)
    return (norm - target).square() / target**2


def input_gradients(scores: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """d(sum of scores)/d(inputs), flattened per sample [N, -1] in fp32, differentiable.

    `create_graph=True`: the penalty built on it trains D through one outer backward.
    """
    (grad,) = torch.autograd.grad(scores.float().sum(), inputs, create_graph=True)
    return grad.float().flatten(1)


def r1_penalty(scores: torch.Tensor, reals: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): |grad D(real)|^2 per sample; `reals` must require grad
    and `scores` be D's output on them (the D pass of the loss itself can be reused)."""
    return input_gradients(scores, reals).square().sum(1)


def lazy_weight(weight: float, every: int, d_index: int) -> float:
    """A regulariser's weight at D step `d_index` of a phase under lazy regularisation
    (StyleGAN2): `weight * every` on every `every`-th step (the first included), 0 between."""
    if weight == 0 or d_index % every:
        return 0.0
    return weight * every


def r1_weight(cfg: TrainConfig, d_index: int) -> float:
    """The R1 term's weight at D step `d_index`: r1_gamma/2, lazily every r1_every steps."""
    return lazy_weight(cfg.r1_gamma / 2, cfg.r1_every, d_index)


def gp_weight(cfg: TrainConfig, d_index: int) -> float:
    """WGAN-GP's penalty weight at D step `d_index`: gp_lambda, lazily every gp_every steps;
    0 for the other losses."""
    if cfg.loss != "wgan-gp":
        return 0.0
    return lazy_weight(cfg.gp_lambda, cfg.gp_every, d_index)


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


class DiscriminatorObjective(nn.Module):
    """D's whole loss as one module forward, so DDP sees one forward and one backward.

    `r1` and `gp` are the step's weights (`r1_weight`, `gp_weight`: 0 skips the term;
    `gp=None`: gp_lambda for wgan-gp). Returns (mean loss, stats). The gradient penalty's
    and R1's inner autograd.grad happen
    inside this forward; the outer `.backward()` is the only one DDP reduces. `scores`
    scores the reals and fakes (a compiled D); the penalty's pass always runs D eagerly (it
    needs a double backward), and so does the pass on the reals when `r1` (R1's weight,
    `r1_weight`) is not 0: R1 is the gradient of that pass, no extra forward.
    """

    def __init__(
        self, discriminator: GrowingNetwork, cfg: TrainConfig, scores: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.D = discriminator
        self.cfg = cfg
        # a list, so that a compiled D is not registered as a second submodule
        self.score_fns = [discriminator if scores is None else scores]

    def forward(
        self,
        real: torch.Tensor,
        fake: torch.Tensor,
        level: int,
        alpha: Alpha,
        mix: torch.Tensor,
        real_target: torch.Tensor | None = None,
        fake_target: torch.Tensor | None = None,
        r1: float = 0.0,
        gp: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        score = self.score_fns[0]
        if r1:  # R1 differentiates this very pass on the reals: eager, as the GP's
            real = real.detach().requires_grad_(True)
            score = self.D
        d_real = score(real, level, alpha)
        d_fake = self.score_fns[0](fake, level, alpha)
        loss = discriminator_loss(self.cfg, d_real, d_fake, real_target, fake_target)
        stats = {"d_real": d_real.detach().float().mean(), "d_fake": d_fake.detach().float().mean()}
        if self.cfg.augment == "ada":  # ADA's overfitting signal, per step
            stats["d_real_sign"] = d_real.detach().float().sign().mean()
        if gp is None:  # not given: the configured weight at every step
            gp = self.cfg.gp_lambda if self.cfg.loss == "wgan-gp" else 0.0
        if gp:
            penalty = gradient_penalty(
                lambda x: self.D(x, level, alpha), real, fake, mix, self.cfg.gp_target
            )
            loss = loss + gp * penalty
            stats["gp"] = penalty.detach().mean()
        if r1:
            penalty = r1_penalty(d_real, real)
            loss = loss + r1 * penalty
            stats["r1"] = penalty.detach().mean()
        return loss.mean(), stats
