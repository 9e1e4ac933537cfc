"""Build the (generator, discriminator) pair a ModelConfig asks for."""

from __future__ import annotations

from progan.config import ModelConfig
from progan.dcgan import DCGANDiscriminator, DCGANGenerator
from progan.networks import Discriminator, Generator, GrowingNetwork


def build_networks(cfg: ModelConfig) -> tuple[GrowingNetwork, GrowingNetwork]:
    """ProGAN or DCGAN networks, freshly initialised."""
    if cfg.arch == "dcgan":
        return DCGANGenerator(cfg), DCGANDiscriminator(cfg)
    return Generator(cfg), Discriminator(cfg)


def build_generator(cfg: ModelConfig) -> GrowingNetwork:
    """Only the generator (for sampling and export)."""
    return DCGANGenerator(cfg) if cfg.arch == "dcgan" else Generator(cfg)
