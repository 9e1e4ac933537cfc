"""Training step, checkpoints and resume: the resumed curve equals the uninterrupted one."""

import copy
import os
import pickle
from pathlib import Path

import pytest
import torch

from progan.checkpoint import UnsafeCheckpointError, load_checkpoint, save_checkpoint
from progan.layers import EqualizedConv2d
from progan.trainer import GANTrainer
from tests.helpers import batch_at, run_steps, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_optimizer_state_reset_per_phase_option():
    official = GANTrainer(tiny_config())
    run_steps(official, 9)  # first step of phase 1
    assert all(s["step"] == 1 for s in official.opt_g.state.values())
    kept = GANTrainer(tiny_config(train={"reset_optimizer": "never"}))
    run_steps(kept, 9)
    assert max(s["step"] for s in kept.opt_g.state.values()) == 9


# bf16 / channels_last against fp32 / contiguous, from one mid-transition fp32 state (12
# steps: trained weights, Adam moments, the 8x8 fade-in at alpha 0.5 for step 13).
# channels_last only reorders memory (other summation orders): over 20 seeds the outputs
# and losses differed by at most 6e-7 absolute (values of order 0.1..7).
CHANNELS_LAST_TOL = {"rtol": 1e-5, "atol": 1e-5}
# bf16 keeps 8 significant bits (rounding 2**-9 = 0.2 % per cast) and every conv and dense
# layer casts. Measured over 20 seeds: G and D outputs up to 1.7e-2 of their largest value,
# the step's losses up to 0.068 abs on d_loss ~ 4..7, 0.0067 on the others. The tolerance
# below is >= 2.7x every one of them.
BF16_OUTPUT_TOL = 4e-2  # of the largest fp32 value of each output
BF16_STATS_TOL = {"rtol": 5e-2, "atol": 2e-2}
STEP_STATS = ("d_loss", "g_loss", "d_real", "d_fake", "gp")


def is_channels_last(x: torch.Tensor) -> bool:
    """NHWC strides, and not also NCHW-contiguous (C > 1 and H * W > 1 in these tensors)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@pytest.fixture(scope="module")
def mid_transition_state():
    trainer = GANTrainer(tiny_config())
    run_steps(trainer, 12)
    assert trainer.point.alpha == 0.5 and trainer.point.resolution == 8
    return trainer.state_dict()


@pytest.fixture(scope="module")
def fp32_reference(mid_transition_state):
    return outputs_and_step(mid_transition_state)


def outputs_and_step(state, **train):
    """G and D outputs on fixed inputs, then one train step, of a trainer loaded with `state`;
    with every conv output of G and D seen on the way."""
    trainer = GANTrainer(tiny_config(train=train))
    # a copy: the optimizer keeps loaded tensors that already have the right dtype and
    # device, so trainers loaded from one in-memory state would share their Adam moments
    trainer.load_state_dict(copy.deepcopy(state))
    conv_outputs: list[torch.Tensor] = []
    for net in (trainer.G, trainer.D):
        for m in net.modules():
            if isinstance(m, EqualizedConv2d):
                m.register_forward_hook(lambda m, i, out: conv_outputs.append(out.detach()))
    g = torch.Generator().manual_seed(7)
    z, x = torch.randn(8, 16, generator=g), torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    if trainer.cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), trainer._autocast():  # the trainer's own autocast (bf16 or off)
        images, scores = trainer.G(z, 1, 0.5), trainer.D(x, 1, 0.5)
    stats = run_steps(trainer, 1)[0]
    assert stats["alpha"] == 0.5
    return trainer, images, scores, stats, conv_outputs


@pytest.mark.parametrize(
    "train",
    [{"channels_last": True}, {"bf16": True}, {"bf16": True, "channels_last": True}],
    ids=["channels_last", "bf16", "bf16+channels_last"],
)
def test_bf16_and_channels_last_match_fp32_and_keep_their_memory_format(
    mid_transition_state, fp32_reference, train
):
    _, ref_images, ref_scores, ref_stats, ref_convs = fp32_reference
    trainer, images, scores, stats, convs = outputs_and_step(mid_transition_state, **train)
    assert len(convs) == len(ref_convs) > 10

    if train.get("bf16"):
        # autocast really ran in bf16: otherwise the comparison below would be vacuous
        assert images.dtype == scores.dtype == torch.bfloat16
        assert stats["d_loss"] != ref_stats["d_loss"]
        for mine, fp32 in ((images, ref_images), (scores, ref_scores)):
            error = (mine.float() - fp32).abs().max().item()
            assert error <= BF16_OUTPUT_TOL * fp32.abs().max().item(), error
        tolerance = BF16_STATS_TOL
    else:
        torch.testing.assert_close(images, ref_images, **CHANNELS_LAST_TOL)
        torch.testing.assert_close(scores, ref_scores, **CHANNELS_LAST_TOL)
        tolerance = CHANNELS_LAST_TOL
    torch.testing.assert_close(
        torch.tensor([stats[k] for k in STEP_STATS]),
        torch.tensor([ref_stats[k] for k in STEP_STATS]),
        **tolerance,
    )

    # memory format: the output of every conv of G and D, in the forward passes and in the
    # train step (D on reals, on fakes, under the gradient penalty; G), and the weights after
    # loading a checkpoint and an optimizer step (the minibatch-stddev concat keeps NHWC:
    # tests/test_layers.py).
    assert all(c.is_contiguous() for c in ref_convs)  # the check tells the formats apart
    weights = [p for net in (trainer.G, trainer.D) for p in net.parameters() if p.dim() == 4]
    if train.get("channels_last"):
        assert is_channels_last(images), f"G output strides {images.stride()}"
        dropped = [i for i, c in enumerate(convs) if not is_channels_last(c)]
        assert not dropped, f"conv outputs {dropped} of {len(convs)} are not channels_last"
        assert all(is_channels_last(w) for w in weights if w.shape[2:] != (1, 1))
    else:
        assert images.is_contiguous() and all(c.is_contiguous() for c in convs)


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
