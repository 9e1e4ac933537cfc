"""The small-data recipes inside the trainer: the paper's path unchanged bit for bit, lazy R1
against a per-step reference, and ADA's p carried by checkpoints."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import progan.augment
import progan.losses
from progan.checkpoint import load_checkpoint, save_checkpoint
from progan.losses import DiscriminatorObjective
from progan.trainer import GANTrainer
from tests.conftest import REPO_ROOT
from tests.helpers import digest, run_steps, tiny_config, trainer_digests

pytestmark = pytest.mark.usefixtures("one_thread")


# The paper's path is compared with the code at BEFORE_RECIPES, the last commit before the
# recipes existed: its progan/ is exported from git and trained on this machine in a
# subprocess (the same 10 steps of `tiny_config`: the 4x4 phase and 2 steps of the 8x8
# fade-in; CPU, fp32, one thread). Digests stored once would hold for one CPU only: oneDNN
# rounds differently on another (a new box failed them with the old code itself). Without
# git history (an sdist, a shallow clone) the digests computed at BEFORE_RECIPES on the first
# box serve, for torch GOLDEN_TORCH only.
BEFORE_RECIPES = "1f40a0a"
GOLDEN_TORCH = "2.14.1+cu130"
GOLDEN = {
    "paper": (
        {},
        "3c2fedaa3c090d524559c08e418cd616",
        "168f45a0f44bc88921c268e94c1a032f",
        "ce48576aa25f5075d40601e701c2a2e6",
    ),
    "bce-rmsprop-noise": (
        {"loss": "bce", "optimizer": "rmsprop", "label_noise": "beta", "instance_noise": 0.1},
        "a52ab4ef068c58700ae90dcad8438953",
        "d65421062550124c6d4f15c48d0d5dc8",
        "54f2ed944ae5e98df683d7ef715e139e",
    ),
}
# run by the exported old progan/ (first on the path) with this checkout's tests.helpers
TRAIN_OLD_CODE = """
import json, sys, torch
torch.set_num_threads(1)
import progan
assert progan.__file__.startswith(sys.argv[1]), progan.__file__
from progan.trainer import GANTrainer
from tests.helpers import run_steps, tiny_config, trainer_digests
out = {}
for name, train in json.loads(sys.argv[2]).items():
    trainer = GANTrainer(tiny_config(train=train))
    run_steps(trainer, 10)
    out[name] = trainer_digests(trainer)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def before_recipes(tmp_path_factory) -> dict[str, list[str]]:
    """G, D and G_ema digests of each GOLDEN config trained by the code at BEFORE_RECIPES on
    this machine; the stored digests where git cannot export it."""
    old = tmp_path_factory.mktemp("before-recipes")
    archive = old / "progan.tar"
    exported = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "-o", str(archive), BEFORE_RECIPES, "progan"],
        capture_output=True, text=True,
    )  # fmt: skip
    if exported.returncode != 0:
        if torch.__version__ != GOLDEN_TORCH:
            pytest.skip(f"no git history ({exported.stderr.strip()}) and torch {torch.__version__}")
        return {name: list(digests) for name, (_, *digests) in GOLDEN.items()}
    with tarfile.open(archive) as tar:
        tar.extractall(old)  # this repository's own files
    configs = json.dumps({name: train for name, (train, *_) in GOLDEN.items()})
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_OLD_CODE, str(old), configs],
        env={**os.environ, "PYTHONPATH": f"{old}{os.pathsep}{REPO_ROOT}", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, cwd=old,  # not this checkout's progan/ via ''
    )  # fmt: skip
    assert done.returncode == 0, f"the code at {BEFORE_RECIPES} did not train:\n{done.stderr}"
    return json.loads(done.stdout.splitlines()[-1])


# every new option at its off value, and the inert ones away from their defaults
ALL_OFF = {
    "r1_gamma": 0.0,
    "r1_every": 3,
    "augment": "none",
    "augment_policy": "cutout",
    "augment_p": 0.5,
    "ada_target": 0.9,
    "ada_interval": 1,
    "ada_kimg": 1.0,
}


def never(*args, **kwargs):
    raise AssertionError("a recipe's code ran with every recipe off")


@pytest.mark.parametrize("name", list(GOLDEN))
def test_the_paper_path_trains_the_same_weights_as_before_the_recipes(
    name, monkeypatch, before_recipes
):
    for module, attr in [
        (progan.augment, "diff_augment"),
        (progan.losses, "r1_penalty"),
        (progan.augment.AdaptiveProbability, "observe"),
    ]:
        monkeypatch.setattr(module, attr, never)
    train, *_ = GOLDEN[name]
    expected = before_recipes[name]
    trainer = GANTrainer(tiny_config(train=train))
    stats = run_steps(trainer, 10)
    assert trainer_digests(trainer) == expected
    assert not {"augment_p", "r1", "d_real_sign"} & set(stats[-1])
    assert "ada" not in trainer.state_dict()


@pytest.mark.parametrize("train", [{}, {"loss": "logistic", "n_critic": 2}])
def test_every_recipe_explicitly_off_equals_the_defaults(train):
    steps = 10 // train.get("n_critic", 1)
    default = GANTrainer(tiny_config(train=train))
    off = GANTrainer(tiny_config(train={**train, **ALL_OFF}))
    assert run_steps(default, steps) == run_steps(off, steps)
    for net in ("G", "D", "G_ema"):
        assert digest(getattr(default, net)) == digest(getattr(off, net)), net


def per_step_r1(monkeypatch, gamma: float, every: int) -> None:
    """Make D's objective add gamma/2 * every * |grad D(real)|^2 on every `every`-th call
    from a pass of its own: R1 written out, not the trainer's lazy schedule or shared pass.
    (Counted over the run: the tiny phases have 8 D steps, so this is also per phase.)"""
    original = DiscriminatorObjective.forward
    calls = itertools.count()

    def forward(self, real, fake, level, alpha, mix, real_target=None, fake_target=None,
                r1=0.0, gp=None):  # fmt: skip
        assert r1 == 0.0  # the trainer under test runs with r1_gamma 0
        loss, stats = original(self, real, fake, level, alpha, mix, real_target, fake_target, gp=gp)
        if next(calls) % every == 0:
            x = real.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.D(x, level, alpha).sum(), x, create_graph=True)
            loss = loss + gamma / 2 * every * grad.square().flatten(1).sum(1).mean()
        return loss, stats

    monkeypatch.setattr(DiscriminatorObjective, "forward", forward)


@pytest.mark.parametrize("every", [1, 2])
def test_lazy_r1_equals_r1_written_out_per_step(every, monkeypatch):
    """r1_every=1 is R1 at every D step; r1_every=2 is twice the weight every other step."""
    gamma, steps = 2.0, 10
    train = {"loss": "logistic", "r1_gamma": gamma, "r1_every": every}
    lazy = GANTrainer(tiny_config(train=train))
    stats = run_steps(lazy, steps)
    assert all("r1" in s for s in stats)  # the monitor keeps the last R1 between lazy steps
    with monkeypatch.context() as patch:
        per_step_r1(patch, gamma, every)
        reference = GANTrainer(tiny_config(train={**train, "r1_gamma": 0.0}))
        expected = run_steps(reference, steps)
    for net in ("G", "D", "G_ema"):
        for mine, theirs in zip(
            getattr(lazy, net).parameters(), getattr(reference, net).parameters(), strict=True
        ):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    mine_d, theirs_d = [s["d_loss"] for s in stats], [s["d_loss"] for s in expected]
    assert mine_d == pytest.approx(theirs_d, rel=1e-5, abs=1e-6)
    plain = run_steps(GANTrainer(tiny_config(train={**train, "r1_gamma": 0.0})), steps)
    assert [s["d_loss"] for s in plain] != pytest.approx(mine_d, rel=1e-3)  # R1 did act


def test_lazy_gp_equals_the_penalty_written_out_every_other_step(monkeypatch):
    """gp_every=2: WGAN-GP's penalty at twice the weight on every other D step, none between
    (the paper's default, gp_every=1, is the golden digest above)."""
    steps, calls = 10, itertools.count()
    lazy = GANTrainer(tiny_config(train={"gp_every": 2}))
    stats = run_steps(lazy, steps)
    original = DiscriminatorObjective.forward

    def forward(self, real, fake, level, alpha, mix, real_target=None, fake_target=None,
                r1=0.0, gp=None):  # fmt: skip
        loss, stats = original(self, real, fake, level, alpha, mix, r1=r1, gp=0.0)
        if next(calls) % 2 == 0:
            critic = lambda x: self.D(x, level, alpha)  # noqa: E731
            penalty = progan.losses.gradient_penalty(critic, real, fake, mix)
            loss = loss + 2 * self.cfg.gp_lambda * penalty.mean()
        return loss, stats

    monkeypatch.setattr(DiscriminatorObjective, "forward", forward)
    reference = GANTrainer(tiny_config())
    expected = run_steps(reference, steps)
    for net in ("G", "D", "G_ema"):
        for mine, theirs in zip(
            getattr(lazy, net).parameters(), getattr(reference, net).parameters(), strict=True
        ):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert [s["d_loss"] for s in stats] == pytest.approx([s["d_loss"] for s in expected])
    monkeypatch.undo()
    every_step = run_steps(GANTrainer(tiny_config()), steps)
    assert [s["d_loss"] for s in every_step] != pytest.approx([s["d_loss"] for s in stats])


def offset_d(trainer: GANTrainer, offset: float) -> GANTrainer:
    """Shift every D score by `offset` (> 0: D leans to 'real', so ADA's p rises)."""
    forward = trainer.D.forward
    trainer.D.forward = lambda x, level, alpha=1.0: forward(x, level, alpha) + offset
    return trainer


def test_a_resumed_ada_run_continues_with_the_same_p(tmp_path):
    """Cut mid-interval and mid lazy-R1 cycle: the checkpoint holds p and the interval's
    signs, so the resumed run equals the uninterrupted one, every stat and weight."""
    train = {
        "loss": "logistic",
        "r1_gamma": 1.0,
        "r1_every": 3,
        "augment": "ada",
        "ada_interval": 3,
        "ada_kimg": 0.2,
    }
    cfg = tiny_config(train=train)
    total, cut = 20, 12
    full = offset_d(GANTrainer(cfg), 2.0)
    expected = run_steps(full, total)

    first = offset_d(GANTrainer(cfg), 2.0)
    before = run_steps(first, cut)
    assert before[-1]["augment_p"] > 0 and first.augment.ada.signs[1] == 8  # mid-interval
    path = save_checkpoint(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = offset_d(GANTrainer.from_state(load_checkpoint(path)), 2.0)
    assert resumed.augment.ada.p == first.augment.ada.p
    after = run_steps(resumed, total - cut)

    # the same stats, except that a fresh process reports no R1 before its first lazy step
    # (D steps 4 and 5 of the 8x8 phase: R1 ran at 3, next at 6)
    assert ["r1" in s for s in after] == [False, False] + [True] * (total - cut - 2)
    stale = [{**s, "r1": None} if i in (cut, cut + 1) else s for i, s in enumerate(expected)]
    assert before + [{**s, "r1": s.get("r1")} for s in after] == stale
    assert full.augment.ada.p == resumed.augment.ada.p > before[-1]["augment_p"]
    for net in ("G", "D", "G_ema"):
        assert digest(getattr(full, net)) == digest(getattr(resumed, net)), net
