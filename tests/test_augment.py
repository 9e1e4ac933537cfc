"""Differentiable augmentation: DiffAugment's transforms, where the trainer applies them, ADA's p.

DiffAugment's semantics (`DiffAugment_pytorch.py`): one policy for reals and fakes; every
call draws new parameters for every image, so two images (or a real and a fake batch) are
not augmented alike. These tests check each transform's defining shape, that draws are
independent per image and per call, that gradients pass through, and ADA's rule for p.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

import progan.augment
from progan.augment import (
    AdaptiveProbability,
    brightness,
    contrast,
    cutout,
    diff_augment,
    saturation,
    transforms_of,
    translation,
)
from progan.config import TrainConfig
from progan.trainer import GANTrainer
from tests.helpers import run_steps, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int = 16, res: int = 8, seed: int = 0) -> torch.Tensor:
    """Random images in [0.5, 1.5): no pixel is 0 before an augmentation zeroes it."""
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) + 0.5


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = x[i + dy, j + dx], zero outside: DiffAugment's translation."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    rows, cols = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    source = (slice(rows.start + dy, rows.stop + dy), slice(cols.start + dx, cols.stop + dx))
    out[..., rows, cols] = x[..., source[0], source[1]]
    return out


def test_translation_shifts_each_image_by_its_own_offset_up_to_an_eighth_with_zero_fill():
    x = images(32, 16)
    out = translation(x, seeded())
    found = []
    for i in range(len(x)):
        shifts = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(out[i], shifted(x[i], dy, dx))
        ]
        assert len(shifts) == 1, f"image {i} is no shift of at most 16/8 = 2 pixels"
        found.append(shifts[0])
    assert len(set(found)) > 8  # drawn per image: 25 possible shifts over 32 images
    assert torch.equal(translation(images(4, 4), seeded()), images(4, 4))  # 4 // 8 = 0


def test_cutout_zeroes_one_half_size_square_per_image_anywhere():
    x = images(32, 8)
    out = cutout(x, seeded())
    corners = set()
    for i in range(len(x)):
        zero = out[i] == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # all channels
        rows = zero[0].any(1).nonzero().flatten().tolist()
        cols = zero[0].any(0).nonzero().flatten().tolist()
        # one rectangle of at most 4x4, exactly 4x4 where it does not cross the border
        assert rows == list(range(rows[0], rows[-1] + 1)) and len(rows) <= 4
        assert cols == list(range(cols[0], cols[-1] + 1)) and len(cols) <= 4
        assert zero[0].sum() == len(rows) * len(cols)
        if rows[0] > 0 and rows[-1] < 7:
            assert len(rows) == 4
        assert torch.equal(out[i][~zero], x[i][~zero])  # the rest untouched
        corners.add((rows[0], cols[0]))
    assert len(corners) > 8


@pytest.mark.parametrize(
    ("transform", "low", "high"),
    [(brightness, -0.5, 0.5), (saturation, 0.0, 2.0), (contrast, 0.5, 1.5)],
)
def test_colour_transforms_are_per_image_affine_maps_in_diffaugments_ranges(transform, low, high):
    x = images(64, 4)
    out = transform(x, seeded())
    if transform is brightness:
        factor = (out - x).flatten(1)  # an offset, one per image
    else:
        dims = 1 if transform is saturation else (1, 2, 3)
        mean = x.mean(dim=dims, keepdim=True)
        factor = ((out - mean) / (x - mean)).flatten(1)  # a scale about the mean, one per image
    torch.testing.assert_close(factor, factor[:, :1].expand_as(factor), rtol=1e-4, atol=1e-4)
    per_image = factor[:, 0]
    assert low <= per_image.min() and per_image.max() <= high
    assert per_image.max() - per_image.min() > 0.6 * (high - low)  # drawn, not fixed


def test_identical_images_and_identical_batches_are_augmented_independently():
    """The same policy everywhere, new parameters for each image and for each call (a real
    batch and a fake batch equal pixel for pixel still come out different)."""
    full = transforms_of("color,translation,cutout")
    same = images(1, 8).expand(16, -1, -1, -1)
    g = seeded()
    out = diff_augment(same, full, g)
    assert len({tuple(o.flatten().tolist()) for o in out}) == 16
    again = diff_augment(same, full, g)
    assert all(not torch.equal(a, b) for a, b in zip(out, again, strict=True))
    # the same generator state gives the same result: a run stays a function of its seed
    assert torch.equal(diff_augment(same, full, seeded()), out)


def test_probability_zero_is_the_identity_and_a_half_changes_about_half():
    x = images(400, 8)
    full = transforms_of("translation,cutout")
    assert torch.equal(diff_augment(x, full, seeded(), torch.tensor(0.0)), x)
    cut = transforms_of("cutout")
    changed = (diff_augment(x, cut, seeded(), torch.tensor(0.5)) != x).flatten(1).any(1)
    assert 160 < changed.sum() < 240
    assert (diff_augment(x, cut, seeded(), 1.0) != x).flatten(1).any(1).all()


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_gradients_pass_through_the_augmentation(policy):
    """gradcheck in float64 with the draws fixed: d augment(x) / dx is the true derivative."""
    x = images(3, 8).double().requires_grad_(True)
    transforms = transforms_of(policy)
    p = torch.tensor(0.5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: diff_augment(x, transforms, seeded(), p), (x,))


def test_ada_p_moves_by_images_over_kimg_towards_the_sign_of_r_t_minus_target():
    cfg = TrainConfig(augment="ada", ada_target=0.6, ada_interval=2, ada_kimg=0.1)
    ada = AdaptiveProbability(cfg, torch.device("cpu"))
    history = []
    for index, sign in enumerate([1.0, 0.5, 1.0, 0.8, 0.2, 0.0, -1.0, 0.4]):
        ada.observe(torch.tensor(sign), 8)
        ada.step_done(index)
        history.append(round(ada.p.item(), 6))
    # r_t over each pair: 0.75, 0.9 (> 0.6: +16/100 each), then 0.1, -0.3 (< 0.6: down, to 0)
    assert history == [0.0, 0.16, 0.16, 0.32, 0.32, 0.16, 0.16, 0.0]
    for index in range(20):  # clipped to [0, 1]
        ada.observe(torch.tensor(1.0), 8)
        ada.step_done(index)
    assert ada.p.item() == 1.0


def ada_rank(rank: int, port: int, out: str) -> None:
    """One of 2 gloo ranks: ADA fed this rank's own signs; writes p and the sums it holds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = TrainConfig(augment="ada", ada_target=0.6, ada_interval=2, ada_kimg=0.1)
        ada = AdaptiveProbability(cfg, torch.device("cpu"), world_size=2)
        for index, sign in enumerate([[1.0, 1.0, 1.0], [0.5, 0.5, 0.0]][rank]):
            ada.observe(torch.tensor(sign), 8)
            ada.step_done(index)
        Path(out, f"{rank}.json").write_text(json.dumps([ada.p.item(), ada.signs.tolist()]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~20 s on the shared 2-core box
def test_under_ddp_every_rank_adapts_p_from_the_signs_of_all_ranks(tmp_path):
    """Rank 0 alone (r_t = 1) would raise p to 0.16, rank 1 alone (0.5) keep it at 0; the
    all-reduced r_t = (16 + 8) / 32 = 0.75 raises it to 32/100 on both."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(ada_rank, args=(port, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1]
    p, signs = results[0]
    assert p == pytest.approx(0.32)
    assert signs == [8.0 + 0.0, 16.0]  # the third step's, global, kept for the next interval


def ada_trainer(offset: float, **train) -> GANTrainer:
    """A trainer whose D scores every image `offset` higher than its own D would: a large
    positive offset is a D that calls everything real (memorised), negative the opposite."""
    cfg = tiny_config(
        train={"loss": "logistic", "augment": "ada", "ada_interval": 2, "ada_kimg": 0.2, **train}
    )
    trainer = GANTrainer(cfg)
    forward = trainer.D.forward
    trainer.D.forward = lambda x, level, alpha=1.0: forward(x, level, alpha) + offset
    return trainer


def test_ada_p_rises_while_d_calls_reals_real_and_stays_at_zero_otherwise():
    memorised = run_steps(ada_trainer(100.0), 10)
    # r_t = 1 > 0.6: +16/200 every 2 D steps of 8 images (4x4 phase: steps 0-7, 8x8: 0-1)
    rising = [s["augment_p"] for s in memorised][1::2]
    assert rising == pytest.approx([0.08 * k for k in range(1, 6)])
    assert all(s["d_real_sign"] == 1.0 for s in memorised)
    honest = run_steps(ada_trainer(-100.0), 10)
    assert all(s["augment_p"] == 0.0 and s["d_real_sign"] == -1.0 for s in honest)


def test_the_trainer_augments_reals_fakes_and_gs_fakes_with_one_policy_and_new_draws(monkeypatch):
    seen: list[tuple[list, torch.Tensor, torch.Tensor]] = []
    original = progan.augment.diff_augment

    def recording(x, transforms, generator, p=1.0):
        out = original(x, transforms, generator, p)
        seen.append((transforms, x.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(progan.augment, "diff_augment", recording)
    trainer = GANTrainer(tiny_config(train={"augment": "diffaugment", "augment_policy": "cutout"}))
    run_steps(trainer, 1)
    assert len(seen) == 3  # D: reals, fakes; G: fakes (the GP mixes the augmented pair)
    assert all(transforms == [cutout] for transforms, _, _ in seen)
    masks = [(out == 0).all(1) for _, _, out in seen]
    assert all(m.flatten(1).any(1).all() for m in masks)  # every image of every call cut
    assert not torch.equal(masks[0], masks[1])  # reals and fakes: independent draws


def test_g_learns_through_the_augmentation():
    """The G step's loss reaches G's weights through D's augmented input."""
    trainer = GANTrainer(tiny_config(train={"augment": "diffaugment"}))
    run_steps(trainer, 1)
    grads = [p.grad for p in trainer.G.parameters() if p.requires_grad]
    assert len(grads) > 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
