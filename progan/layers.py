"""ProGAN's building blocks: equalized learning rate, pixel norm, minibatch stddev, resampling."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.2
HE_GAIN = math.sqrt(2.0)

# id(layer) -> its weight * scale, already in the compute dtype, while `shared_scaled_weights`
# is active (one autograd graph: D on reals, on fakes and under the gradient penalty).
_scaled: dict[tuple[int, str], torch.Tensor] | None = None


@contextmanager
def shared_scaled_weights() -> Iterator[None]:
    """Within the block, each equalized layer scales (and casts) its weight once, not per call.

    Equal results: the same product and cast, reused by every call in the block, and
    gradients reach the weight through it. Use it around ONE forward/backward graph; the
    weights must not change inside (no optimizer step). Compiled code ignores it (Inductor
    fuses the scale into the kernel that reads the weight).
    """
    global _scaled
    outer, _scaled = _scaled, {}
    try:
        yield
    finally:
        _scaled = outer


def compute_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs matmuls/convs in on `like`'s device, else `like`'s own."""
    device = like.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return like.dtype


def scaled_weight(layer: EqualizedConv2d | EqualizedLinear) -> torch.Tensor:
    """`layer.weight * layer.scale`, shared within `shared_scaled_weights` (eager only)."""
    return _shared(layer, "scaled", lambda: layer.weight * layer.scale)


def _shared(layer: nn.Module, kind: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`make()` in the compute dtype, made once per `shared_scaled_weights` block."""
    if torch.compiler.is_compiling() or _scaled is None:  # compiling first: no guard on it
        return make()
    key = (id(layer), kind)
    w = _scaled.get(key)
    if w is None:
        w = _scaled[key] = make().to(compute_dtype(layer.weight))
    return w


def _four_taps(w: torch.Tensor) -> torch.Tensor:
    """3x3 kernels -> 4x4: the sum of the kernel at its 4 offsets (the official fused kernel)."""
    w = F.pad(w, (1, 1, 1, 1))
    return w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]


def upsample_conv(layer: EqualizedConv2d, x: torch.Tensor) -> torch.Tensor:
    """`layer(upsample(x))` as one stride-2 transposed conv (a 3x3 `layer` only)."""
    w = _shared(layer, "up", lambda: _four_taps(layer.weight * layer.scale).flip(2, 3))
    return F.conv_transpose2d(x, w.transpose(0, 1), layer.bias, stride=2, padding=1)


def conv_downsample(layer: EqualizedConv2d, x: torch.Tensor) -> torch.Tensor:
    """`downsample(layer(x))` as one stride-2 conv (a 3x3 `layer` only)."""
    w = _shared(layer, "down", lambda: _four_taps(layer.weight * (layer.scale / 4)))
    return F.conv2d(x, w, layer.bias, stride=2, padding=1)


class EqualizedConv2d(nn.Module):
    """Conv with weights ~ N(0, 1) scaled at run time by gain / sqrt(fan_in) (He's constant)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, gain: float = HE_GAIN) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.scale = gain / math.sqrt(in_ch * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, scaled_weight(self), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel={k}, scale={self.scale:.4g}"


class EqualizedLinear(nn.Module):
    """Linear layer with equalized learning rate (see EqualizedConv2d)."""

    def __init__(
        self, in_features: int, out_features: int, gain: float = HE_GAIN, bias: bool = True
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, scaled_weight(self), self.bias)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"{i}, {o}, scale={self.scale:.4g}"


def is_channels_last(x: torch.Tensor) -> bool:
    """NHWC strides (and not also NCHW-contiguous, as a tensor with C = 1 can be)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if it is a lower-precision float (bf16/fp16), else unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise each pixel's feature vector to unit mean square (dim 1 = channels).

    The statistic is computed in at least float32 and the result cast back to x's dtype:
    under CUDA autocast `rsqrt` returns float32, which would otherwise turn every
    generator activation after it into float32.
    """
    xf = at_least_fp32(x)
    return (xf * torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + eps)).to(x.dtype)


class PixelNorm(nn.Module):
    """Module form of `pixel_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_norm(x)


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (at least 1)."""
    for g in range(min(n, limit), 0, -1):
        if n % g == 0:
            return g
    return 1


class MinibatchStdDev(nn.Module):
    """Append one channel: the mean stddev of features across groups of `group_size` samples.

    As the official v2 code: samples are split into groups (sample i joins group i % M),
    the stddev over each group is averaged over channels and pixels, then broadcast. A batch
    not divisible by the group size uses the largest group size that divides it.
    """

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = largest_divisor_at_most(n, self.group_size)
        # statistics in at least float32 (bf16 inputs under autocast), never lower precision
        y = at_least_fp32(x).reshape(g, -1, c, h, w)
        y = y - y.mean(dim=0)
        y = (y.square().mean(dim=0) + 1e-8).sqrt()
        y = y.mean(dim=(1, 2, 3)).to(x.dtype)  # [M]
        y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)
        if is_channels_last(x):  # torch.cat would return NCHW: concatenate NHWC views
            nhwc = torch.cat([x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)], dim=3)
            return nhwc.permute(0, 3, 1, 2)
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def downsample(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling."""
    return F.avg_pool2d(x, 2)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU with ProGAN's slope 0.2."""
    return F.leaky_relu(x, LRELU_SLOPE)
