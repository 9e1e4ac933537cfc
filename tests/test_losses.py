"""Losses and the gradient penalty, against float64 references."""

import torch
import torch.nn.functional as F

from progan.config import ModelConfig, TrainConfig
from progan.losses import discriminator_loss, generator_loss, gradient_penalty
from progan.networks import Discriminator


def test_gradient_penalty_of_a_linear_critic_is_analytic():
    w = torch.randn(3, 4, 4)
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    gp = gradient_penalty(lambda x: (x * w).flatten(1).sum(1), real, fake, torch.rand(5))
    torch.testing.assert_close(gp, ((w.norm() - 1) ** 2).expand(5))


def test_gradient_penalty_matches_float64_finite_differences():
    torch.manual_seed(0)
    d = Discriminator(ModelConfig(resolution=8, fmap_base=32, fmap_max=8, mbstd_group_size=2))
    real, fake, mix = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4)
    gp = gradient_penalty(lambda x: d(x, 1), real, fake, mix)

    d64 = d.double()
    x_hat = (real + mix.view(-1, 1, 1, 1) * (fake - real)).double()
    h = 1e-6
    grad = torch.zeros_like(x_hat)
    flat = x_hat.view(-1)
    with torch.no_grad():
        for j in range(flat.numel()):  # sum of scores: cross-sample terms (mbstd) included
            flat[j] += h
            up = d64(x_hat, 1).sum()
            flat[j] -= 2 * h
            down = d64(x_hat, 1).sum()
            flat[j] += h
            grad.view(-1)[j] = (up - down) / (2 * h)
    reference = (grad.flatten(1).norm(dim=1) - 1) ** 2
    torch.testing.assert_close(gp.double(), reference, rtol=1e-3, atol=1e-5)


def test_loss_formulas():
    r, f = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    wgan = TrainConfig(loss="wgan-gp", drift=0.001)
    torch.testing.assert_close(discriminator_loss(wgan, r, f), f - r + 0.001 * r**2)
    torch.testing.assert_close(generator_loss(wgan, f), -f)
    bce = TrainConfig(loss="bce")
    expected = F.softplus(-r) + F.softplus(f)
    torch.testing.assert_close(discriminator_loss(bce, r, f), expected)
    torch.testing.assert_close(discriminator_loss(TrainConfig(loss="logistic"), r, f), expected)
    torch.testing.assert_close(generator_loss(bce, f), F.softplus(-f))
    ls = TrainConfig(loss="lsgan")
    torch.testing.assert_close(discriminator_loss(ls, r, f), (r - 1) ** 2 + f**2)
    torch.testing.assert_close(generator_loss(ls, f), (f - 1) ** 2)
    soft = discriminator_loss(bce, r, f, torch.full((2,), 0.9), torch.full((2,), 0.1))
    hard = F.binary_cross_entropy_with_logits
    torch.testing.assert_close(
        soft,
        hard(r, torch.full((2,), 0.9), reduction="none")
        + hard(f, torch.full((2,), 0.1), reduction="none"),
    )
