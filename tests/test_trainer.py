"""Training step, checkpoints and resume: the resumed curve equals the uninterrupted one."""

import os
import pickle
from pathlib import Path

import pytest
import torch

from progan.checkpoint import UnsafeCheckpointError, load_checkpoint, save_checkpoint
from progan.trainer import GANTrainer, NonFiniteLossError
from tests.helpers import batch_at, run_steps, tiny_config


def params_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    "train",
    [
        {},
        {"loss": "bce", "optimizer": "rmsprop", "label_noise": "beta", "instance_noise": 0.1},
        {"loss": "wgan", "n_critic": 2, "g_steps": 2, "reset_optimizer": "never"},
        {"loss": "lsgan", "reset_optimizer": "resolution"},
    ],
)
def test_resume_from_checkpoint_reproduces_the_uninterrupted_losses(tmp_path, train):
    n_critic = train.get("n_critic", 1)
    kimg = 0.064 * n_critic
    cfg = tiny_config(train=train, schedule={"transition_kimg": kimg, "stabilize_kimg": kimg})
    total, cut = 20, 11  # 8 iterations per phase: the cut falls mid-transition
    full = GANTrainer(cfg)
    expected = run_steps(full, total)

    first = GANTrainer(cfg)
    before = run_steps(first, cut)
    path = save_checkpoint(first.state_dict(), tmp_path / "ckpt.pt")
    del first
    resumed = GANTrainer.from_state(load_checkpoint(path))
    after = run_steps(resumed, total - cut)

    assert before + after == expected  # bit-identical floats, every stat of every step
    assert resumed.images_shown == full.images_shown
    for net in ("G", "D", "G_ema"):
        assert params_equal(getattr(resumed, net), getattr(full, net)), net


def test_step_reports_stats_and_counts_images():
    trainer = GANTrainer(tiny_config(train={"n_critic": 2}))
    stats = run_steps(trainer, 1)[0]
    assert {"d_loss", "g_loss", "gp", "d_real", "d_fake", "alpha", "lr", "images_shown"} <= set(
        stats
    )
    assert stats["images_shown"] == 16 == trainer.images_shown
    assert all(v == v for v in stats.values())  # no NaN


def test_transition_alpha_rises_and_batch_mismatch_is_refused():
    trainer = GANTrainer(tiny_config())
    stats = run_steps(trainer, 12)
    assert [s["alpha"] for s in stats[8:12]] == [0.0, 0.125, 0.25, 0.375]
    assert stats[8]["resolution"] == 8.0
    with pytest.raises(ValueError, match="global batch of 8"):
        trainer.train_step(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))


def test_nan_loss_is_reported_before_the_weights_change():
    trainer = GANTrainer(tiny_config())
    run_steps(trainer, 1)
    snapshot = [p.clone() for p in trainer.D.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"d_loss is not finite \(here nan\)"):
        trainer.train_step(torch.full((8, 3, 4, 4), float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(snapshot, trainer.D.parameters(), strict=True))


def test_optimizer_state_reset_per_phase_option():
    official = GANTrainer(tiny_config())
    run_steps(official, 9)  # first step of phase 1
    assert all(s["step"] == 1 for s in official.opt_g.state.values())
    kept = GANTrainer(tiny_config(train={"reset_optimizer": "never"}))
    run_steps(kept, 9)
    assert max(s["step"] for s in kept.opt_g.state.values()) == 9


def test_bf16_and_channels_last_step_on_cpu():
    trainer = GANTrainer(tiny_config(train={"bf16": True, "channels_last": True}))
    stats = run_steps(trainer, 10)
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for s in stats)


def test_checkpoint_is_atomic_and_holds_the_schedule_position(tmp_path):
    trainer = GANTrainer(tiny_config())
    run_steps(trainer, 10)
    path = save_checkpoint(trainer.state_dict(), tmp_path / "c.pt")
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # no temp file left behind
    state = load_checkpoint(path)
    assert state["images_shown"] == 80 and state["phase_name"] == "01-0008-transition"
    assert state["alpha"] == 0.25 and state["config"]["model"]["resolution"] == 8


def test_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "progan-checkpoint", "G": Evil()}, f)
    torch.save({"format": "progan-checkpoint", "G": Evil()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(UnsafeCheckpointError, match="could run code"):
            load_checkpoint(p)
    assert not marker.exists()


def test_loading_into_a_different_model_names_the_key(tmp_path):
    state = GANTrainer(tiny_config()).state_dict()
    other = GANTrainer(tiny_config(model={"fmap_max": 8}))
    with pytest.raises(ValueError, match="fmap_max"):
        other.load_state_dict(state)


def test_dcgan_runs_through_the_same_interface(tmp_path):
    cfg = tiny_config(
        model={"arch": "dcgan", "dcgan_width": 8},
        train={"loss": "bce", "label_noise": "beta", "g_steps": 2},
        schedule={"start_resolution": 8},
    )
    trainer = GANTrainer(cfg)
    assert [p.kind for p in trainer.plan] == ["stabilize"]
    stats = run_steps(trainer, 3)
    assert stats[-1]["resolution"] == 8.0
    path = save_checkpoint(trainer.state_dict(), Path(tmp_path) / "d.pt")
    again = GANTrainer.from_state(load_checkpoint(path))
    assert params_equal(again.G_ema, trainer.G_ema)
    assert batch_at(0, 2, 8).shape == (2, 3, 8, 8)
