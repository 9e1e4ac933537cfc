"""DCGAN baseline (Radford et al. 2016) with the same interface as the ProGAN networks.

Generator: transposed convs with batch norm and ReLU, tanh output. Discriminator: strided
convs with LeakyReLU(0.2) and batch norm (not on the first layer), one logit out. Weights
N(0, 0.02), batch-norm scales N(1, 0.02). It does not grow: `level` must be the final one
and `alpha` is ignored, so the trainer and the pipeline drive it like a one-phase ProGAN.
"""

from __future__ import annotations

import itertools

from torch import nn

from progan.config import ModelConfig
from progan.networks import Alpha, GrowingNetwork, level_of


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv weights N(0, 0.02); batch-norm weight N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class FixedResolutionNetwork(GrowingNetwork):
    """A network with only its final level: every parameter is always active."""

    def check_level(self, level: int | None) -> int:
        if level is not None and level != self.max_level:
            raise ValueError(f"DCGAN runs only at its final level {self.max_level}, got {level}")
        return self.max_level

    def active_modules(self, level: int, fading: bool) -> list[nn.Module]:
        return [self]


def _widths(cfg: ModelConfig) -> list[int]:
    """Channels from the 4x4 layer up to the last hidden layer (halving; 64 -> 8w,4w,2w,w)."""
    n = level_of(cfg.resolution)  # number of 2x up/down-samplings between 4 and resolution
    return [cfg.dcgan_width * 2 ** (n - 1 - i) for i in range(n)] or [cfg.dcgan_width]


class DCGANGenerator(FixedResolutionNetwork):
    """z -> 4x4 (transposed conv) -> ... -> resolution, tanh."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.latent_size = cfg.latent_size
        self.max_level = level_of(cfg.resolution)
        w = _widths(cfg)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cfg.latent_size, w[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(w[0]),
            nn.ReLU(True),
        ]
        for c_in, c_out in itertools.pairwise(w):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            ]
        if self.max_level > 0:
            layers += [nn.ConvTranspose2d(w[-1], cfg.num_channels, 4, 2, 1, bias=False)]
        else:
            layers += [nn.Conv2d(w[-1], cfg.num_channels, 3, 1, 1, bias=False)]
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z, level: int | None = None, alpha: Alpha = 1.0):
        self.check_level(level)
        return self.net(z.view(z.shape[0], -1, 1, 1))


class DCGANDiscriminator(FixedResolutionNetwork):
    """resolution -> ... -> 4x4 (strided convs) -> one logit per image, shape [N]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_level = level_of(cfg.resolution)
        w = list(reversed(_widths(cfg)))  # w, 2w, 4w, 8w
        layers: list[nn.Module] = []
        if self.max_level > 0:
            layers += [nn.Conv2d(cfg.num_channels, w[0], 4, 2, 1, bias=False)]
        else:
            layers += [nn.Conv2d(cfg.num_channels, w[0], 3, 1, 1, bias=False)]
        layers.append(nn.LeakyReLU(0.2, True))
        for c_in, c_out in itertools.pairwise(w):
            layers += [
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(w[-1], 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, img, level: int | None = None, alpha: Alpha = 1.0):
        self.check_level(level)
        return self.net(img).flatten()
