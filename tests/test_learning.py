"""A few hundred steps bring generated image statistics measurably closer to the real ones."""

import torch
import torch.nn.functional as F

from progan.config import GANConfig
from progan.loop import LoopOptions, run_phase
from progan.sampling import fixed_latents, generate
from progan.trainer import GANTrainer
from tests.helpers import TensorImages, disc_images

RES = 8


def distance(fake: torch.Tensor, real: torch.Tensor) -> float:
    """Per-channel mean and std gaps plus the mean-image gap (all in [-1, 1] units)."""
    stats = lambda x: (x.mean((0, 2, 3)), x.std((0, 2, 3)), x.mean(0))  # noqa: E731
    return sum((a - b).abs().mean().item() for a, b in zip(stats(fake), stats(real), strict=True))


def train_and_measure(cfg: GANConfig) -> tuple[float, float]:
    real = disc_images(2048, RES)
    # uint8 datasets per resolution, as the LMDB reader delivers them
    per_res = {
        r: TensorImages(((F.avg_pool2d(real, RES // r) + 1) * 127.5).round().to(torch.uint8))
        for r in (4, 8)
    }
    trainer = GANTrainer(cfg)
    z = fixed_latents(512, cfg.model.latent_size)
    before = distance(generate(trainer.G_ema, z), real)
    for phase in trainer.plan:
        run_phase(trainer, per_res[phase.resolution], phase, LoopOptions())
    assert trainer.point.done
    return before, distance(generate(trainer.G_ema, z), real)


def test_tiny_progan_learns_the_image_statistics():
    cfg = GANConfig.model_validate(
        {
            "model": {"resolution": RES, "latent_size": 32, "fmap_base": 128, "fmap_max": 32},
            "train": {"ema_beta": 0.9},
            "schedule": {"transition_kimg": 1.6, "stabilize_kimg": 1.6, "batch_base": 16},
        }
    )
    before, after = train_and_measure(cfg)  # 300 steps through 4x4 -> 8x8 with a fade-in
    assert after < 0.3 * before, (before, after)


def test_dcgan_learns_the_image_statistics():
    cfg = GANConfig.model_validate(
        {
            "model": {"arch": "dcgan", "resolution": RES, "latent_size": 32, "dcgan_width": 32},
            "train": {
                "loss": "bce",
                "betas": [0.5, 0.999],
                "ema_beta": 0.0,
                "g_steps": 2,
                "label_noise": "beta",
            },
            "schedule": {
                "start_resolution": RES,
                "stabilize_kimg": 4.8,
                "batch_base": 16,
                "lr_base": 0.0005,
            },
        }
    )
    before, after = train_and_measure(cfg)
    assert after < 0.5 * before, (before, after)
