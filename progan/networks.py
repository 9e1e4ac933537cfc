"""ProGAN generator and discriminator, built once to the final resolution, grown by `level`.

`level` 0 is 4x4, level L is 4 * 2**L. During a transition into `level` (alpha < 1), G's
output is lerp(upsample(toRGB_{L-1}(x_{L-1})), toRGB_L(x_L), alpha) and D's input path is
lerp(fromRGB_{L-1}(downsample(img)), block_L(fromRGB_L(img)), alpha), as in the paper.
Nothing is rebuilt when growing: every block exists from the start and is used when reached.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from progan.config import ModelConfig
from progan.layers import (
    HE_GAIN,
    EqualizedConv2d,
    EqualizedLinear,
    MinibatchStdDev,
    conv_downsample,
    downsample,
    lrelu,
    pixel_norm,
    upsample,
    upsample_conv,
)

Alpha = float | torch.Tensor


def level_of(resolution: int) -> int:
    """Level index of a resolution: 4 -> 0, 8 -> 1, ..., 1024 -> 8."""
    return int(math.log2(resolution)) - 2


def resolution_of(level: int) -> int:
    """Resolution of a level: 0 -> 4, 1 -> 8, ..."""
    return 4 * 2**level


def channels(cfg: ModelConfig, level: int) -> int:
    """Feature maps at `level`: the paper's min(fmap_base / 2**stage, fmap_max), stage = level+1."""
    return max(cfg.fmap_min, min(int(cfg.fmap_base / 2.0 ** (level + 1)), cfg.fmap_max))


def blend(old: torch.Tensor, new: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """lerp(old, new, alpha); a tensor alpha (compiled steps) in the blended tensors' dtype."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(new.dtype)
    return torch.lerp(old, new, alpha)


def is_fading(level: int, alpha: Alpha) -> bool:
    """Whether the forward pass blends in the previous level (a tensor alpha always does)."""
    return level > 0 and (isinstance(alpha, torch.Tensor) or alpha < 1.0)


class GrowingNetwork(nn.Module):
    """Shared bookkeeping of G and D: the final level and which parameters a phase uses."""

    max_level: int

    def check_level(self, level: int | None) -> int:
        """Resolve `None` to the final level and refuse levels the network does not have."""
        if level is None:
            return self.max_level
        if not 0 <= level <= self.max_level:
            raise ValueError(f"level {level} outside 0..{self.max_level} for this network")
        return level

    def active_modules(self, level: int, fading: bool) -> list[nn.Module]:
        raise NotImplementedError

    def active_parameters(self, level: int, fading: bool) -> list[nn.Parameter]:
        """Parameters that a forward pass at (level, fading) uses."""
        return [p for m in self.active_modules(level, fading) for p in m.parameters()]

    def set_trainable(self, level: int, fading: bool) -> None:
        """requires_grad on exactly the parameters a phase uses (what DDP needs)."""
        active = {id(p) for p in self.active_parameters(level, fading)}
        for p in self.parameters():
            p.requires_grad_(id(p) in active)


class GeneratorBlock(nn.Module):
    """Upsample, then two 3x3 convs, each followed by leaky ReLU and pixel norm.

    `fused`: upsample + first conv as one transposed conv (the same function).
    """

    def __init__(self, in_ch: int, out_ch: int, fused: bool = False) -> None:
        super().__init__()
        self.conv0 = EqualizedConv2d(in_ch, out_ch, 3)
        self.conv1 = EqualizedConv2d(out_ch, out_ch, 3)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = upsample_conv(self.conv0, x) if self.fused else self.conv0(upsample(x))
        x = pixel_norm(lrelu(x))
        return pixel_norm(lrelu(self.conv1(x)))


class GeneratorBase(nn.Module):
    """Latent -> 4x4: pixel-normed latent, dense (the paper's 4x4 conv), 3x3 conv."""

    def __init__(self, latent_size: int, ch: int) -> None:
        super().__init__()
        self.ch = ch
        # Official code: gain sqrt(2)/4 on the dense layer, one bias per feature map.
        self.dense = EqualizedLinear(latent_size, ch * 16, gain=HE_GAIN / 4, bias=False)
        self.bias = nn.Parameter(torch.zeros(ch))
        self.conv = EqualizedConv2d(ch, ch, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.dense(pixel_norm(z)).view(-1, self.ch, 4, 4) + self.bias.view(1, -1, 1, 1)
        x = pixel_norm(lrelu(x))
        return pixel_norm(lrelu(self.conv(x)))


class Generator(GrowingNetwork):
    """ProGAN generator for any power-of-two resolution 4..1024."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.latent_size = cfg.latent_size
        self.max_level = level_of(cfg.resolution)
        ch = [channels(cfg, lv) for lv in range(self.max_level + 1)]
        self.base = GeneratorBase(cfg.latent_size, ch[0])
        self.blocks = nn.ModuleList(
            GeneratorBlock(ch[lv - 1], ch[lv], cfg.fused_scale)
            for lv in range(1, self.max_level + 1)
        )
        self.to_rgb = nn.ModuleList(EqualizedConv2d(c, cfg.num_channels, 1, gain=1.0) for c in ch)

    def forward(
        self, z: torch.Tensor, level: int | None = None, alpha: Alpha = 1.0
    ) -> torch.Tensor:
        level = self.check_level(level)
        x = self.base(z)
        previous = x
        for block in self.blocks[:level]:
            previous = x
            x = block(x)
        out = self.to_rgb[level](x)
        if is_fading(level, alpha):
            skip = upsample(self.to_rgb[level - 1](previous))
            out = blend(skip, out, alpha)
        return out

    def active_modules(self, level: int, fading: bool) -> list[nn.Module]:
        modules = [self.base, *self.blocks[:level], self.to_rgb[level]]
        if fading and level > 0:
            modules.append(self.to_rgb[level - 1])
        return modules


class DiscriminatorBlock(nn.Module):
    """Two 3x3 convs with leaky ReLU, then 2x2 average pooling.

    `fused` (the official `fused_scale`): the second conv and the pooling as one stride-2
    conv, with the leaky ReLU after the pooling, as the official code orders it there.
    """

    def __init__(self, in_ch: int, out_ch: int, fused: bool = False) -> None:
        super().__init__()
        self.conv0 = EqualizedConv2d(in_ch, in_ch, 3)
        self.conv1 = EqualizedConv2d(in_ch, out_ch, 3)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = lrelu(self.conv0(x))
        if self.fused:
            return lrelu(conv_downsample(self.conv1, x))
        return downsample(lrelu(self.conv1(x)))


class DiscriminatorHead(nn.Module):
    """4x4 -> score: minibatch stddev, 3x3 conv, dense, dense to one linear output."""

    def __init__(self, ch: int, dense_ch: int, mbstd_group_size: int) -> None:
        super().__init__()
        self.mbstd = MinibatchStdDev(mbstd_group_size) if mbstd_group_size > 0 else None
        self.conv = EqualizedConv2d(ch + (1 if self.mbstd else 0), ch, 3)
        self.dense = EqualizedLinear(ch * 16, dense_ch)
        self.out = EqualizedLinear(dense_ch, 1, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = lrelu(self.conv(x))
        x = lrelu(self.dense(x.flatten(1)))
        return self.out(x).squeeze(1)


class Discriminator(GrowingNetwork):
    """ProGAN discriminator mirroring the generator; returns one score per image, shape [N]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_level = level_of(cfg.resolution)
        ch = [channels(cfg, lv) for lv in range(self.max_level + 1)]
        dense_ch = max(cfg.fmap_min, min(cfg.fmap_base, cfg.fmap_max))  # nf(0)
        self.from_rgb = nn.ModuleList(EqualizedConv2d(cfg.num_channels, c, 1) for c in ch)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(ch[lv], ch[lv - 1], cfg.fused_scale)
            for lv in range(1, self.max_level + 1)
        )
        self.head = DiscriminatorHead(ch[0], dense_ch, cfg.mbstd_group_size)

    def forward(
        self, img: torch.Tensor, level: int | None = None, alpha: Alpha = 1.0
    ) -> torch.Tensor:
        level = self.check_level(level)
        expected = resolution_of(level)
        if img.shape[-1] != expected or img.shape[-2] != expected:
            raise ValueError(
                f"discriminator at level {level} expects {expected}x{expected} images, "
                f"got {tuple(img.shape[-2:])}"
            )
        x = lrelu(self.from_rgb[level](img))
        if level > 0:
            x = self.blocks[level - 1](x)
            if is_fading(level, alpha):
                skip = lrelu(self.from_rgb[level - 1](downsample(img)))
                x = blend(skip, x, alpha)
            for block in reversed(self.blocks[: level - 1]):
                x = block(x)
        return self.head(x)

    def active_modules(self, level: int, fading: bool) -> list[nn.Module]:
        modules = [self.from_rgb[level], *self.blocks[:level], self.head]
        if fading and level > 0:
            modules.append(self.from_rgb[level - 1])
        return modules


def fade_in_real(images: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """Blend real images with their down-then-up-sampled version by the transition's alpha.

    During a transition D sees fakes that fade between resolutions; the reals must fade the
    same way, or D could tell them apart by sharpness alone.
    """
    if isinstance(alpha, float) and alpha >= 1.0:
        return images
    return blend(upsample(downsample(images)), images, alpha)
