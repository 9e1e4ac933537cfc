"""The generator's running average: a half-life in images (ema_kimg) and its ramp-up."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import progan.trainer
from progan.ema import ema_beta_at
from progan.trainer import GANTrainer
from tests.helpers import digest, run_steps, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n_critic", [1, 2])
def test_a_half_life_of_one_step_averages_as_beta_one_half(n_critic):
    """A half-life of the images one G step consumes (n_critic D batches of 8) is beta 0.5."""
    train = {"n_critic": n_critic}
    by_half_life = GANTrainer(tiny_config(train={**train, "ema_kimg": n_critic * 8 / 1000}))
    by_beta = GANTrainer(tiny_config(train={**train, "ema_beta": 0.5}))
    steps = 10 // n_critic
    assert run_steps(by_half_life, steps) == run_steps(by_beta, steps)
    assert digest(by_half_life.G) == digest(by_beta.G)
    assert digest(by_half_life.G_ema) == digest(by_beta.G_ema)
    assert digest(by_half_life.G_ema) != digest(by_half_life.G)


def test_the_rampup_caps_the_half_life_at_a_share_of_the_images_shown(monkeypatch):
    betas: list[float] = []
    update = progan.trainer.update_ema

    def recording(ema, model, beta):
        betas.append(beta)
        update(ema, model, beta)

    monkeypatch.setattr(progan.trainer, "update_ema", recording)
    trainer = GANTrainer(tiny_config(train={"ema_kimg": 10.0, "ema_rampup": 0.5}))
    run_steps(trainer, 10)
    # after step k, 8k images shown: half-life min(10,000, 4k) = 4k images, 8 images a step
    assert betas == pytest.approx([0.5 ** (2 / k) for k in range(1, 11)], rel=1e-12)
    # far into a run the cap is off: StyleGAN2's 10 kimg at batch 32
    assert ema_beta_at(0.999, 10.0, 0.05, 10**6, 32) == pytest.approx(0.5 ** (32 / 10_000))
    assert ema_beta_at(0.999, None, None, 10**6, 32) == 0.999


def test_a_rampup_without_a_half_life_is_refused_by_name():
    with pytest.raises(ValidationError, match=r"train\.ema_rampup needs train\.ema_kimg"):
        tiny_config(train={"ema_rampup": 0.05})
