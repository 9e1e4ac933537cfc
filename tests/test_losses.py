"""Losses, the gradient penalty and R1, against float64 references."""

import copy

import pytest
import torch
import torch.nn.functional as F

from progan.config import ModelConfig, TrainConfig
from progan.losses import (
    DiscriminatorObjective,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    r1_penalty,
    r1_weight,
)
from progan.networks import Discriminator


def tiny_discriminator() -> Discriminator:
    """An 8x8 D with minibatch stddev (cross-sample terms in its input gradients)."""
    torch.manual_seed(0)
    return Discriminator(ModelConfig(resolution=8, fmap_base=32, fmap_max=8, mbstd_group_size=2))


def finite_difference_gradients(d, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """d(sum of D's scores at level 1)/dx by central differences on a float64 copy of D,
    per sample [N, -1]."""
    d64 = copy.deepcopy(d).double()
    x = x.detach().double().clone()
    grad = torch.zeros_like(x)
    flat = x.view(-1)
    with torch.no_grad():
        for j in range(flat.numel()):  # sum of scores: cross-sample terms (mbstd) included
            flat[j] += h
            up = d64(x, 1).sum()
            flat[j] -= 2 * h
            down = d64(x, 1).sum()
            flat[j] += h
            grad.view(-1)[j] = (up - down) / (2 * h)
    return grad.flatten(1)


def test_gradient_penalty_of_a_linear_critic_is_analytic():
    w = torch.randn(3, 4, 4)
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    gp = gradient_penalty(lambda x: (x * w).flatten(1).sum(1), real, fake, torch.rand(5))
    torch.testing.assert_close(gp, ((w.norm() - 1) ** 2).expand(5))


def test_gradient_penalty_matches_float64_finite_differences():
    d = tiny_discriminator()
    real, fake, mix = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4)
    gp = gradient_penalty(lambda x: d(x, 1), real, fake, mix)

    x_hat = real + mix.view(-1, 1, 1, 1) * (fake - real)
    reference = (finite_difference_gradients(d, x_hat).norm(dim=1) - 1) ** 2
    torch.testing.assert_close(gp.double(), reference, rtol=1e-3, atol=1e-5)


def test_r1_of_a_linear_and_a_quadratic_critic_is_analytic():
    w = torch.randn(3, 4, 4)
    real = torch.randn(5, 3, 4, 4, requires_grad=True)
    linear = r1_penalty((real * w).flatten(1).sum(1), real)
    torch.testing.assert_close(linear, (w.square().sum()).expand(5))  # |w|^2 everywhere
    quadratic = r1_penalty(0.5 * real.square().flatten(1).sum(1), real)
    torch.testing.assert_close(quadratic, real.detach().square().flatten(1).sum(1))  # |x|^2


def test_r1_matches_float64_finite_differences_on_a_tiny_discriminator():
    d = tiny_discriminator()
    real = torch.randn(2, 3, 8, 8, requires_grad=True)
    r1 = r1_penalty(d(real, 1), real)
    reference = finite_difference_gradients(d, real).square().sum(1)
    torch.testing.assert_close(r1.double(), reference, rtol=1e-3, atol=1e-5)


def test_lazy_r1_weight_is_k_times_gamma_over_2_every_kth_step():
    lazy = TrainConfig(r1_gamma=2.0, r1_every=3)
    assert [r1_weight(lazy, i) for i in range(7)] == [3.0, 0, 0, 3.0, 0, 0, 3.0]
    assert [r1_weight(TrainConfig(r1_gamma=2.0), i) for i in range(3)] == [1.0, 1.0, 1.0]
    assert r1_weight(TrainConfig(), 0) == 0.0  # off by default


@pytest.mark.parametrize("loss", ["logistic", "wgan-gp"])
def test_the_objective_adds_r1_of_its_own_pass_on_the_reals(loss):
    """loss(r1=w) = loss(r1=0) + w * mean |grad D(real)|^2, and D's gradients match an R1
    computed on its own forward pass: sharing the reals' pass changes nothing."""
    d = tiny_discriminator()
    objective = DiscriminatorObjective(d, TrainConfig(loss=loss))
    real, fake, mix = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4)

    used = list(d.parameters())

    def grads(total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return torch.autograd.grad(total, used, allow_unused=True)

    plain, plain_stats = objective(real, fake, 1, 1.0, mix)
    with_r1, stats = objective(real, fake, 1, 1.0, mix, r1=0.7)
    x = real.clone().requires_grad_(True)
    separate = r1_penalty(d(x, 1), x).mean()  # r1_penalty: against float64 above
    assert "r1" not in plain_stats
    torch.testing.assert_close(stats["r1"], separate)
    torch.testing.assert_close(with_r1, plain + 0.7 * separate)
    reference = grads(plain + 0.7 * separate)
    assert sum(g is not None for g in reference) > 5  # the level-1 layers
    for mine, theirs in zip(grads(with_r1), reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


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
