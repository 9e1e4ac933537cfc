"""Small shared builders for the progan tests: tiny configs and deterministic data."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from progan.config import GANConfig


def tiny_config(**overrides) -> GANConfig:
    """A 4x4 -> 8x8 ProGAN with a handful of channels; sections merged from overrides."""
    raw = {
        "model": {"resolution": 8, "latent_size": 16, "fmap_base": 64, "fmap_max": 16},
        "train": {"seed": 3},
        "schedule": {"transition_kimg": 0.064, "stabilize_kimg": 0.064, "batch_base": 8},
    }
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    return GANConfig.model_validate(raw)


def batch_at(images_shown: int, batch: int, resolution: int) -> torch.Tensor:
    """A deterministic uint8 batch that depends only on the position in the run."""
    g = torch.Generator().manual_seed(10_000 + images_shown)
    return torch.randint(0, 256, (batch, 3, resolution, resolution), generator=g, dtype=torch.uint8)


def run_steps(trainer, steps: int) -> list[dict[str, float]]:
    """Advance `trainer` by `steps` iterations on `batch_at` data."""
    out = []
    for _ in range(steps):
        p = trainer.point
        reals = [
            batch_at(trainer.images_shown + i * p.batch_size, p.batch_size, p.resolution)
            for i in range(trainer.cfg.train.n_critic)
        ]
        out.append(trainer.train_step(reals))
    return out


class TensorImages(torch.utils.data.Dataset):
    """A Dataset over an in-memory uint8 tensor [N, C, H, W] at several resolutions."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def disc_images(n: int, res: int, seed: int = 0) -> torch.Tensor:
    """A simple image set in [-1, 1]: a red disc, jittered, on a blue background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    cx = res / 2 + torch.randn(n, 1, 1, generator=g) * res / 10
    cy = res / 2 + torch.randn(n, 1, 1, generator=g) * res / 10
    disc = (((xx - cx) ** 2 + (yy - cy) ** 2) < (res / 3.2) ** 2).float()
    img = torch.stack(
        [0.9 * disc - 0.6 * (1 - disc), -0.7 + 0 * disc, 0.6 * (1 - disc) - 0.8 * disc], 1
    )
    return (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(-1, 1)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch on `n` intra-op threads; restore the previous count after.

    Tiny networks gain nothing from more threads, and on a busy box extra threads spin.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def digest(module: torch.nn.Module) -> str:
    """Names and bytes of every tensor of the state dict (32 hex digits of SHA-256)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def trainer_digests(trainer) -> list[str]:
    """`digest` of a GANTrainer's G, D and G_ema, in that order."""
    return [digest(trainer.G), digest(trainer.D), digest(trainer.G_ema)]


def ignore_sigint() -> None:
    """Start a child as `cmd &` in a script does: with SIGINT ignored (a preexec_fn)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
