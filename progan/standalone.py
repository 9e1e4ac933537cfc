"""Load a generator bundle (`progan export --format bundle`) with torch and safetensors only.

This file is the model card's loader and travels inside every bundle as `progan_bundle.py`:
it must stay stand-alone (torch, safetensors, and numpy for the seeded latents; nothing of
this project, nothing unpickled). It reproduces `progan.networks.Generator` at the bundle's
level and alpha op for op, and `progan.sampling.indexed_latents`, so its images equal
`progan generate`'s pixel for pixel (tests/test_bundle.py).
"""

import json

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def load_bundle(folder):
    """(generate(z, psi=1.0) -> images in [-1, 1], config dict) of a bundle folder."""
    with open(f"{folder}/config.json") as f:
        cfg = json.load(f)
    w, s = load_file(f"{folder}/model.safetensors"), cfg["scales"]
    pn = lambda x: x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)  # noqa: E731
    act = lambda x: pn(F.leaky_relu(x, 0.2))  # noqa: E731
    up = lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest")  # noqa: E731

    def conv(x, name):
        k = w[f"{name}.weight"]
        return F.conv2d(x, k * s[name], w[f"{name}.bias"], padding=k.shape[-1] // 2)

    @torch.no_grad()
    def generate(z, psi=1.0):
        x = F.linear(pn(z), w["base.dense.weight"] * s["base.dense"])
        x = x * psi if psi != 1.0 else x  # the truncation trick, as progan.sampling does it
        x = act(x.view(len(z), -1, 4, 4) + w["base.bias"].view(1, -1, 1, 1))
        x = prev = act(conv(x, "base.conv"))
        for i in range(cfg["level"]):
            prev, x = x, act(conv(act(conv(up(x), f"blocks.{i}.conv0")), f"blocks.{i}.conv1"))
        out = conv(x, f"to_rgb.{cfg['level']}")
        if cfg["alpha"] < 1.0 and cfg["level"] > 0:  # fading in: blend the previous level
            out = torch.lerp(up(conv(prev, f"to_rgb.{cfg['level'] - 1}")), out, cfg["alpha"])
        return out

    return generate, cfg


def latents(seed, count, latent_size):
    """Latent i of `progan generate --seed SEED` (numpy's SeedSequence([seed, i]))."""
    seeds = [
        np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] for i in range(count)
    ]
    rngs = [torch.Generator().manual_seed(int(t)) for t in seeds]
    return torch.stack([torch.randn(latent_size, generator=g) for g in rngs])


def to_uint8(images):
    """[-1, 1] -> uint8 [N, H, W, C], as `progan generate` writes its PNGs."""
    unit = images.add(1.0).div(2.0).clamp(0.0, 1.0)
    return unit.mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
