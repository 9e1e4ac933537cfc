"""Equalized learning rate, pixel norm and minibatch stddev behave as the paper specifies."""

import math

import pytest
import torch
import torch.nn.functional as F

from progan.layers import EqualizedConv2d, EqualizedLinear, MinibatchStdDev, pixel_norm


def test_equalized_conv_stores_unit_normal_weights_and_scales_at_run_time():
    torch.manual_seed(0)
    conv = EqualizedConv2d(64, 128, 3)
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.02)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=0.02)
    assert conv.scale == pytest.approx(math.sqrt(2) / math.sqrt(64 * 9))
    x = torch.randn(2, 64, 8, 8)
    expected = F.conv2d(x, conv.weight * math.sqrt(2 / (64 * 9)), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)


def test_equalized_linear_scale_and_gain():
    lin = EqualizedLinear(512, 10, gain=1.0)
    assert lin.scale == pytest.approx(1 / math.sqrt(512))
    x = torch.randn(3, 512)
    torch.testing.assert_close(lin(x), x @ (lin.weight / math.sqrt(512)).T + lin.bias)
    # default gain: He's constant sqrt(2 / fan_in), as a plain linear layer would apply it
    he = EqualizedLinear(512, 10)
    torch.nn.init.normal_(he.bias)
    torch.testing.assert_close(he(x), F.linear(x, he.weight * math.sqrt(2 / 512), he.bias))
    # Effective He init: outputs of unit-variance inputs keep variance ~ gain^2.
    torch.manual_seed(1)
    big = EqualizedLinear(2048, 2048, gain=1.0)
    assert big(torch.randn(256, 2048)).var().item() == pytest.approx(1.0, rel=0.1)


def test_pixel_norm_gives_unit_mean_square_per_pixel():
    g = torch.Generator().manual_seed(0)
    scale = torch.empty(4, 1, 5, 5).uniform_(math.log(0.1), math.log(10), generator=g).exp()
    x = torch.randn(4, 32, 5, 5, generator=g) * scale  # per-pixel magnitudes 0.1 .. 10
    y = pixel_norm(x)
    torch.testing.assert_close(y.square().mean(dim=1), torch.ones(4, 5, 5), rtol=1e-4, atol=1e-4)


def test_minibatch_stddev_adds_one_channel_with_group_statistic():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4, 4)
    y = MinibatchStdDev(4)(x)
    assert y.shape == (8, 6, 4, 4)
    torch.testing.assert_close(y[:, :5], x)
    # Group g of the official layout holds samples {m, m + M, ...} with M = N / G = 2.
    group = x[[0, 2, 4, 6]]
    expected = (group.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
    torch.testing.assert_close(y[0, 5], expected.expand(4, 4))
    torch.testing.assert_close(y[2, 5], expected.expand(4, 4))


@pytest.mark.parametrize(
    ("n", "group_size"), [(1, 1), (2, 2), (3, 3), (5, 1), (6, 3), (7, 1), (12, 4)]
)
def test_minibatch_stddev_handles_batches_not_divisible_by_group(n, group_size):
    """A batch not divisible by 4 uses the largest group size that divides it; sample i then
    joins group i % M (M = n / group size), and its appended channel is that group's
    stddev (biased, + 1e-8 under the root) averaged over channels and pixels."""
    x = torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(n))
    y = MinibatchStdDev(4)(x)
    assert y.shape == (n, 4, 4, 4)
    torch.testing.assert_close(y[:, :3], x)
    m = n // group_size
    for i in range(n):
        group = x[i % m :: m]
        assert len(group) == group_size
        expected = (group.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(y[i, 3], expected.expand(4, 4))
