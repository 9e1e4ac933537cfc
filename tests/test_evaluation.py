"""End-of-phase / `progan evaluate` metrics against a prepared dataset (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.evaluation import EvaluationError, evaluate_generator, real_batches
from tests.pipeline_helpers import make_tiny_dataset, tiny_pipeline_config


class Replay(nn.Module):
    """A 'generator' that returns real images (in [-1, 1]) whatever the latent."""

    latent_size = 4

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("images", images.float() / 127.5 - 1)
        self.anchor = nn.Parameter(torch.zeros(()))  # so generate() finds a device
        self.next = 0

    def forward(self, z: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        idx = torch.arange(self.next, self.next + z.shape[0]) % self.images.shape[0]
        self.next += z.shape[0]
        return self.images[idx]


class Noise(nn.Module):
    """Uniform noise images."""

    latent_size = 4

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor, level: int, alpha: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(z.abs().sum() * 1000) % 2**31)
        return torch.rand(z.shape[0], 3, self.resolution, self.resolution, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=64, resolution=16)


def reals(dataset, resolution, n=64):
    return torch.cat(list(real_batches(dataset, resolution, n, seed=5)))


def test_real_images_score_near_the_floor_and_noise_far_above(dataset, tmp_path):
    kw = dict(metrics=("swd", "msssim"), num_images=64, cache_dir=tmp_path)
    real = evaluate_generator(Replay(reals(dataset, 16)), 2, 1.0, dataset, 16, **kw)
    noise = evaluate_generator(Noise(16), 2, 1.0, dataset, 16, **kw)
    assert set(real) >= {"SWDx1e3_16", "SWDx1e3_avg", "SWDx1e3_avg_real_floor"}
    assert real["eval_images"] == 64
    assert real["SWDx1e3_avg"] < 2 * real["SWDx1e3_avg_real_floor"]
    assert noise["SWDx1e3_avg"] > 5 * real["SWDx1e3_avg"]
    # diversity: the replayed reals are as diverse as the reals; noise pairs are unrelated
    assert real["msssim_fake"] == pytest.approx(real["msssim_real"], abs=0.05)
    assert noise["msssim_fake"] < 0.1


def test_real_statistics_are_cached_and_results_repeat(dataset, tmp_path):
    kw = dict(metrics=("swd",), num_images=32, cache_dir=tmp_path / "cache")
    first = evaluate_generator(Noise(16), 2, 1.0, dataset, 16, **kw)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    second = evaluate_generator(Noise(16), 2, 1.0, dataset, 16, **kw)
    assert list((tmp_path / "cache").iterdir()) == cached
    assert {k: v for k, v in first.items() if k != "eval_seconds"} == {
        k: v for k, v in second.items() if k != "eval_seconds"
    }


def test_small_resolutions_leave_out_what_they_cannot_measure(dataset, tmp_path):
    kw = dict(metrics=("swd", "msssim"), num_images=16, cache_dir=tmp_path)
    at8 = evaluate_generator(Noise(8), 1, 1.0, dataset, 8, **kw)
    assert "SWDx1e3_8" in at8 and "msssim_fake" not in at8
    at4 = evaluate_generator(Noise(4), 0, 1.0, dataset, 4, **kw)
    assert not any(k.startswith("SWD") for k in at4)


def test_fid_without_weights_fails_in_one_line(dataset, tmp_path):
    with pytest.raises(EvaluationError, match="no FID weights file"):
        evaluate_generator(Noise(16), 2, 1.0, dataset, 16, metrics=("fid",), cache_dir=tmp_path)
    with pytest.raises(EvaluationError, match="allowed: swd, msssim, fid, kid"):
        evaluate_generator(Noise(16), 2, 1.0, dataset, 16, metrics=("is",), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="fid_weights"):
        tiny_pipeline_config(dataset, tmp_path, eval={"enabled": True, "metrics": ["fid"]})


def test_evaluate_command_prints_and_writes_the_numbers(dataset, tmp_path, capsys):
    from pipeline.cli import main
    from progan.checkpoint import save_checkpoint
    from progan.config import GANConfig
    from progan.trainer import GANTrainer

    cfg = GANConfig.model_validate(
        {"model": {"resolution": 16, "latent_size": 8, "fmap_base": 32, "fmap_max": 8}}
    )
    trainer = GANTrainer(cfg)
    trainer.images_shown = trainer.plan[-1].end_images  # as if trained to 16x16
    ckpt = save_checkpoint(trainer.state_dict(), tmp_path / "state.pt")
    out = tmp_path / "eval.json"
    args = ["evaluate", str(ckpt), "--data", str(dataset), "--num-images", "32"]
    assert main([*args, "--cache", str(tmp_path / "c"), "--json", str(out)]) == 0
    numbers = __import__("json").loads(out.read_text())
    assert numbers["eval_images"] == 32 and numbers["SWDx1e3_avg"] > 0
    assert "msssim_fake" in numbers
    assert "SWDx1e3_avg" in capsys.readouterr().out
    assert main([*args, "--metrics", "fid"]) == 2
    assert "no FID weights file" in capsys.readouterr().err
