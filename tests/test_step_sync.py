"""The training step never waits for the device between log points; a NaN still stops it.

Reading a device value on the host (`.item()`, `.tolist()`, `if t:`, `.cpu()`, `float(t)`)
blocks until the GPU has run everything queued. These tests count such reads made by the
project's own code (progan/, pipeline/) while `run_phase` trains, on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from progan.loop import LoopOptions, run_phase
from progan.trainer import GANTrainer, NonFiniteLossError
from tests.helpers import TensorImages, tiny_config

ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "progan"), str(ROOT / "pipeline"))
# The sampler builds index lists on the host from host tensors (the DataLoader's side of
# the pipeline, possibly in worker processes): those reads never wait for a device.
HOST_SIDE = (str(ROOT / "progan" / "data.py"),)
HOST_READS = ("item", "tolist", "__bool__", "cpu", "__float__", "__int__", "numpy")


pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int = 32, res: int = 8) -> TensorImages:
    g = torch.Generator().manual_seed(0)
    return TensorImages(torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8))


@pytest.fixture
def host_reads(monkeypatch):
    """Counts host reads of tensors whose caller is project code, outside `read_stats`."""
    seen: list[str] = []
    paused = [False]

    def counting(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not paused[0] and caller.startswith(OURS) and caller not in HOST_SIDE:
                seen.append(f"Tensor.{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return method

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    read = GANTrainer.read_stats

    def read_stats(self):
        paused[0] = True
        try:
            return read(self)
        finally:
            paused[0] = False

    monkeypatch.setattr(GANTrainer, "read_stats", read_stats)
    return seen


RECIPE = {"loss": "logistic", "r1_gamma": 1.0, "r1_every": 2, "augment": "ada", "ada_interval": 1}


@pytest.mark.parametrize(
    "train",
    [{}, {"bf16": True, "n_critic": 2}, RECIPE, {**RECIPE, "augment": "diffaugment"}],
    ids=["fp32", "bf16", "ada+lazy-r1", "diffaugment"],
)
def test_no_host_read_between_log_points(host_reads, train):
    n_critic = train.get("n_critic", 1)
    cfg = tiny_config(train=train, schedule={"transition_kimg": 0.064 * n_critic})
    trainer = GANTrainer(cfg)
    every = 4 * 8 * n_critic  # a log point every 4 steps
    logged: list[tuple[float, int]] = []
    phase = trainer.plan[1]  # the 8x8 transition: alpha moves every step
    trainer.images_shown = phase.start_images
    run_phase(
        trainer,
        images(),
        phase,
        LoopOptions(log_every_images=every, checkpoint_every_images=10**9),
        on_stats=lambda s: logged.append((s["images_shown"], len(host_reads))),
    )
    assert [shown for shown, _ in logged] == [phase.start_images + every * k for k in (1, 2)]
    assert not host_reads, host_reads[:5]
    # the read itself works and returns real numbers
    assert all(v == v for v in trainer.read_stats().values())


def test_nan_stops_the_phase_at_the_next_read_before_any_checkpoint_of_it(monkeypatch):
    trainer = GANTrainer(tiny_config(schedule={"stabilize_kimg": 0.128}))  # 16 steps at 4x4
    prepare = GANTrainer._prepare_real

    def poisoned(self, real, alpha, fading):  # reals turn NaN from 40 images on (step 6)
        out = prepare(self, real, alpha, fading)
        return out * float("nan") if self.images_shown >= 40 else out

    monkeypatch.setattr(GANTrainer, "_prepare_real", poisoned)
    checkpoints: list[int] = []
    first_nan = r"d_loss is not finite \(here nan\) at images_shown=40"
    with pytest.raises(NonFiniteLossError, match=first_nan):
        run_phase(
            trainer,
            images(32, 4),
            trainer.plan[0],
            # no log point inside the phase: the checkpoint points must read the check
            LoopOptions(log_every_images=10**9, checkpoint_every_images=32),
            on_checkpoint=lambda t, s, final: checkpoints.append(t.images_shown),
        )
    assert checkpoints == [32]  # the one before the NaN; none after it
    assert trainer.images_shown == 64  # stopped at the read that followed it
    with pytest.raises(NonFiniteLossError):  # nor can anyone else checkpoint these weights
        trainer.state_dict()


def test_without_finite_checks_a_nan_is_only_reported():
    trainer = GANTrainer(tiny_config(train={"check_finite": False}))
    stats = trainer.train_step(torch.full((8, 3, 4, 4), float("nan")))
    assert stats["d_loss"] != stats["d_loss"]
