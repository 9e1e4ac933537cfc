"""Equalized learning rate, pixel norm and minibatch stddev behave as the paper specifies."""

import contextlib
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from progan.config import ModelConfig
from progan.layers import (
    EqualizedConv2d,
    EqualizedLinear,
    MinibatchStdDev,
    PixelNorm,
    downsample,
    is_channels_last,
    lrelu,
    pixel_norm,
    shared_scaled_weights,
    upsample,
)
from progan.networks import Discriminator, Generator


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


# Ops that CUDA autocast runs in float32 whatever their input (autocast's "fp32 list", the
# ones these layers could use). CPU autocast's lists differ, so a bf16 test on CPU alone
# would not see a layer that lets such an op's float32 output through.
CUDA_FP32_OPS = {
    torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow, torch.sum, torch.Tensor.sum,
    torch.norm, torch.Tensor.norm, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log,
    torch.reciprocal, torch.Tensor.reciprocal, F.softplus,
}  # fmt: skip


class CudaFp32Ops(TorchFunctionMode):
    """Make the CUDA-autocast fp32-list ops return float32, as they do on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in CUDA_FP32_OPS and isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.float()
        return out


def bf16_layers() -> list[tuple[str, Callable, torch.Tensor]]:
    """(name, layer, bf16 input) for every building block and the whole networks."""
    torch.manual_seed(0)
    cfg = ModelConfig(resolution=8, latent_size=16, fmap_base=64, fmap_max=16)
    g, d = Generator(cfg), Discriminator(cfg)
    x = torch.randn(8, 16, 8, 8, dtype=torch.bfloat16)
    img = torch.randn(8, 3, 8, 8, dtype=torch.bfloat16)
    z = torch.randn(8, 16, dtype=torch.bfloat16)
    return [
        ("conv", EqualizedConv2d(16, 16, 3), x),
        ("linear", EqualizedLinear(16, 4), z),
        ("pixel_norm", pixel_norm, x),
        ("PixelNorm", PixelNorm(), x),
        ("mbstd", MinibatchStdDev(4), x),
        ("lrelu", lrelu, x),
        ("upsample", upsample, x),
        ("downsample", downsample, x),
        ("G base", g.base, z),
        ("G block", g.blocks[0], x[:, :, :4, :4]),
        ("D block", d.blocks[0], x),
        ("D head", d.head, x[:, :, :4, :4]),
        ("G", lambda z: g(z, 1, 0.5), z),
        ("D", lambda i: d(i, 1, 0.5), img),
    ]


@pytest.mark.parametrize("fp32_ops", [False, True], ids=["cpu-autocast", "cuda-fp32-list"])
def test_every_layer_returns_the_compute_dtype_under_bf16_autocast(fp32_ops):
    fp32_list = CudaFp32Ops() if fp32_ops else contextlib.nullcontext()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), fp32_list:
        wrong = {
            name: layer(x).dtype
            for name, layer, x in bf16_layers()
            if layer(x).dtype != torch.bfloat16
        }
    assert not wrong, wrong


def test_minibatch_stddev_keeps_channels_last_and_the_fp32_statistic():
    x = torch.randn(8, 5, 4, 4)
    y = MinibatchStdDev(4)(x.contiguous(memory_format=torch.channels_last))
    assert is_channels_last(y), y.stride()
    torch.testing.assert_close(y, MinibatchStdDev(4)(x), rtol=0, atol=0)
    # bf16 input: the statistic equals the fp32 one of the same (bf16-rounded) values
    xb = x.bfloat16()
    expected = MinibatchStdDev(4)(xb.float())[:, 5]
    assert (MinibatchStdDev(4)(xb)[:, 5].float() - expected).abs().max() <= 4e-3 * expected.max()


class WeightProducts(TorchFunctionMode):
    """Counts multiplications that read a parameter (the equalized-LR weight scaling)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("mul", "__mul__") and any(
            isinstance(a, nn.Parameter) for a in args
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def critic_graph(d: Discriminator, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D three times in one graph, as the D step runs it (reals, fakes, gradient penalty)."""
    x_hat = torch.lerp(real, fake, 0.3).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x_hat, 1, 0.5).float().sum(), x_hat, create_graph=True)
    return (d(fake, 1, 0.5) - d(real, 1, 0.5)).float().mean() + grad.float().square().mean()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_shared_scaled_weights_scale_once_per_graph_with_equal_results(bf16):
    torch.manual_seed(0)
    d = Discriminator(ModelConfig(resolution=8, latent_size=16, fmap_base=64, fmap_max=16))
    real, fake = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    results = {}
    for shared in (False, True):
        d.zero_grad()
        counter = WeightProducts()
        share = shared_scaled_weights() if shared else contextlib.nullcontext()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), counter, share:
            loss = critic_graph(d, real, fake)
        loss.backward()
        results[shared] = (loss.detach(), [p.grad.clone() for p in d.parameters()], counter.count)
    (loss0, grads0, per_call), (loss1, grads1, once) = results[False], results[True]
    layers = [m for m in d.modules() if isinstance(m, (EqualizedConv2d, EqualizedLinear))]
    used = sum(1 for m in layers if m.weight.grad is not None and m.weight.grad.any())
    assert once == used and per_call == 3 * used, (once, per_call, used)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)  # the same products and casts
    # Gradients: the three uses' contributions are summed before the scale (fp32: another
    # summation order) and, under bf16, in bf16 (one more rounding of 2**-9 relative).
    for g0, g1 in zip(grads0, grads1, strict=True):
        limit = (2**-7 if bf16 else 1e-6) * g0.abs().max().item()
        assert (g1 - g0).abs().max().item() <= limit
