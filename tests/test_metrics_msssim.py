"""MS-SSIM diversity (progan.metrics.msssim): identical pairs give 1, independent noise ~0,
small images use fewer scales instead of crashing, and the pair streaming."""

from __future__ import annotations

import pytest
import torch

from progan.metrics import MSSSIMDiversity, ms_ssim, msssim_betas
from progan.metrics.msssim import PAPER_BETAS


def noise(n: int, res: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("res", [16, 32, 64, 128])
def test_identical_pairs_score_one_and_noise_pairs_near_zero(res):
    a, b = noise(8, res, 0), noise(8, res, 1)
    torch.testing.assert_close(ms_ssim(a, a), torch.ones(8))
    assert ms_ssim(a, b).mean() < 0.1  # per pair it fluctuates in [0, 0.2]


def test_scales_follow_the_image_size():
    assert msssim_betas(256) == PAPER_BETAS
    assert [len(msssim_betas(r)) for r in (16, 32, 64, 128, 176)] == [2, 2, 3, 4, 5]
    assert sum(msssim_betas(64)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 16x16"):
        msssim_betas(8)


def test_float_and_uint8_inputs_agree():
    a, b = noise(2, 64, 0), noise(2, 64, 1)
    blend = ((a.float() + b.float()) / 2).round().to(torch.uint8)
    as_float = blend.float() / 127.5 - 1
    torch.testing.assert_close(ms_ssim(a, blend), ms_ssim(a.float() / 127.5 - 1, as_float))
    assert 0.1 < ms_ssim(a, blend).mean() < 0.95


def test_diversity_pairs_consecutive_images_across_batches():
    same = noise(1, 32, 0).repeat(9, 1, 1, 1)
    acc = MSSSIMDiversity()
    for batch in same.split(3):  # odd batches: one image is carried to the next batch
        acc.update(batch)
    result = acc.compute()
    assert result["n_pairs"] == 4
    assert result["mean"] == pytest.approx(1.0, abs=1e-5)

    diverse = MSSSIMDiversity()
    diverse.update(noise(10, 32, 3))
    assert diverse.compute()["mean"] < 0.1
