"""The generator tools: `progan generate | interpolate | edit | export` and their loader.

Everything runs through the real CLI entry point on tiny 16x16 networks saved the way the
pipeline saves them (a run's generator.pt, a full GANTrainer checkpoint).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.cli import main
from pipeline.phases.checkpoints import STATE_FILE, checkpoint_name, export_generator
from pipeline.tools.args import parse_size
from pipeline.tools.generator import load_generator, sample_latents
from progan.checkpoint import save_checkpoint
from progan.dcgan import DCGANGenerator
from progan.sampling import generate, latent_direction, truncate, truncation
from progan.trainer import GANTrainer
from tests.conftest import REPO_ROOT
from tests.helpers import run_steps, tiny_config

ONNX_READY = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with generator.pt (16x16, done) and a mid-transition checkpoint."""
    run_dir = tmp_path_factory.mktemp("run")
    trainer = GANTrainer(tiny_config(model={"resolution": 16}))
    run_steps(trainer, 10)  # 4x4 stabilize (8 steps of 8), then 2 steps into the 8x8 fade-in
    point = trainer.point
    assert point.kind == "transition" and 0.0 < point.alpha < 1.0
    mid = run_dir / "checkpoints" / checkpoint_name(trainer.images_shown)
    save_checkpoint(trainer.state_dict(), mid / STATE_FILE)
    trainer.images_shown = trainer.plan[-1].end_images  # the plan's end: 16x16, alpha 1
    export_generator(trainer.state_dict(), trainer.plan[-1], run_dir / "generator.pt")
    return run_dir, trainer


@pytest.fixture(scope="module")
def ckpt(trained) -> str:
    return str(trained[0] / "generator.pt")


def cli(*args) -> int:
    return main([str(a) for a in args])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def cell(grid: np.ndarray, row: int, col: int, h: int, w: int, pad: int = 2) -> np.ndarray:
    """Image (row, col) of a torchvision make_grid picture with `pad` pixels of padding."""
    y, x = pad + row * (h + pad), pad + col * (w + pad)
    return grid[y : y + h, x : x + w]


# -- loading --------------------------------------------------------------------------------


def test_loads_generator_file_run_dir_and_training_checkpoint(trained):
    run_dir, trainer = trained
    gen = load_generator(run_dir)
    assert gen.source == run_dir / "generator.pt"
    assert (gen.level, gen.alpha, gen.resolution, gen.latent_size) == (2, 1.0, 16, 16)
    assert not gen.module.training
    [mid_dir] = (run_dir / "checkpoints").iterdir()
    mid = load_generator(mid_dir)  # a checkpoint directory: its state.pt
    state = torch.load(mid.source, weights_only=True)
    assert (mid.level, mid.alpha) == (1, state["alpha"]) and 0 < mid.alpha < 1
    z = sample_latents(0, 3, 16)
    reference = trainer.G_ema(z, 2, 1.0)  # trainer's G_ema did not change after the save
    torch.testing.assert_close(gen.render(z), reference, rtol=0, atol=0)


def test_alpha_zero_is_reported_as_the_previous_level(tmp_path, trained):
    trainer = trained[1]
    kept, trainer.images_shown = trainer.images_shown, trainer.plan[1].start_images
    path = save_checkpoint(trainer.state_dict(), tmp_path / "c.pt")  # 8x8 fade-in, alpha 0
    trainer.images_shown = kept
    gen = load_generator(path)
    assert (gen.level, gen.alpha, gen.resolution) == (0, 1.0, 4)
    z = sample_latents(0, 2, 16)
    up = F.interpolate(trainer.G_ema(z, 0, 1.0), scale_factor=2.0, mode="nearest")
    torch.testing.assert_close(trainer.G_ema(z, 1, 0.0), up)


def test_missing_file_is_one_line_and_exit_2_from_the_console_script(tmp_path):
    missing = tmp_path / "nope.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "generate", str(missing), "--out", "x.png"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: checkpoint not found: {missing}"


def test_checkpoint_without_g_ema_and_non_checkpoint(tmp_path, ckpt, capsys):
    state = torch.load(ckpt, weights_only=True)
    no_ema = save_checkpoint({"config": state["config"]}, tmp_path / "no_ema.pt")
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    for path, message in ((no_ema, "has no G_ema"), (text, "is not a progan checkpoint")):
        assert cli("export", path, "--format", "torchscript", "--out", tmp_path / "x.pt") == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_malicious_checkpoints_are_refused_without_running_code(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump({"format": "progan-checkpoint", "G_ema": Evil()}, f)
    torch.save({"format": "progan-checkpoint", "G_ema": Evil()}, tmp_path / "saved.pt")
    for name, message in (("pickled.pt", "not unpickling"), ("saved.pt", "could run code")):
        assert cli("generate", tmp_path / name, "--out", tmp_path / "g.png") == 2
        assert message in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "g.png").exists()


# -- generate ---------------------------------------------------------------------------------


def test_generate_grid_size_and_individual_files(tmp_path, ckpt):
    out, individual = tmp_path / "grid.png", tmp_path / "faces"
    args = ["--n", 10, "--nrow", 5, "--size", "12x20", "--out", out, "--individual", individual]
    assert cli("generate", ckpt, *args) == 0
    assert Image.open(out).size == (5 * 12 + 6 * 2, 2 * 20 + 3 * 2)  # WxH, 2-pixel padding
    files = sorted(individual.glob("*.png"))
    assert [f.name for f in files] == [f"seed0-{i:05d}.png" for i in range(10)]
    assert {Image.open(f).size for f in files} == {(12, 20)}
    assert cli("generate", ckpt, "--n", 64, "--out", tmp_path / "native.png") == 0
    assert Image.open(tmp_path / "native.png").size == (8 * 16 + 9 * 2,) * 2


def test_same_seed_same_images_prefix_stable_other_seed_differs(tmp_path, ckpt):
    for name, seed, n in (("a", 7, 6), ("b", 7, 6), ("c", 7, 3), ("d", 8, 6)):
        assert cli("generate", ckpt, "--seed", seed, "--n", n, "--individual", tmp_path / name) == 0
    a = [pixels(tmp_path / "a" / f"seed7-{i:05d}.png") for i in range(6)]
    b = [pixels(tmp_path / "b" / f"seed7-{i:05d}.png") for i in range(6)]
    c = [pixels(tmp_path / "c" / f"seed7-{i:05d}.png") for i in range(3)]
    d = [pixels(tmp_path / "d" / f"seed8-{i:05d}.png") for i in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], c, strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(a, d, strict=True))
    assert len({x.tobytes() for x in a}) == 6


def test_indexed_latents_depend_only_on_seed_and_index():
    torch.testing.assert_close(sample_latents(3, [5, 1], 32), sample_latents(3, 6, 32)[[5, 1]])
    assert not torch.equal(sample_latents(3, 4, 32), sample_latents(4, 4, 32))
    z = sample_latents(0, 2000, 64)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1.0) < 0.02


def test_truncation_pulls_toward_one_average_image(ckpt):
    gen = load_generator(ckpt)
    z = gen.latents(0, 4)
    plain, half, zero = gen.render(z), gen.render(z, psi=0.5), gen.render(z, psi=0.0)
    torch.testing.assert_close(gen.render(z, psi=1.0), plain, rtol=0, atol=0)
    assert torch.equal(gen.render(truncate(z, 0.5)), plain)  # why z-scaling is not enough
    assert (zero - zero[:1]).abs().max() < 1e-6  # psi 0: every latent gives the same image
    spread = [(x - x.mean(0)).square().mean().item() for x in (plain, half, zero)]
    assert spread[0] > spread[1] > spread[2]
    torch.testing.assert_close(gen.render(z), plain)  # the hook is gone afterwards


def test_truncation_of_dcgan_equals_scaling_z():
    g = DCGANGenerator(tiny_config(model={"arch": "dcgan", "dcgan_width": 4}).model).eval()
    z = torch.randn(3, 16)
    with truncation(g, 0.6):
        truncated = generate(g, z)
    torch.testing.assert_close(truncated, generate(g, truncate(z, 0.6)))


# -- interpolate ------------------------------------------------------------------------------


def test_interpolation_gif_and_frames_pass_through_the_keyframes(tmp_path, ckpt):
    assert cli("generate", ckpt, "--seed", 2, "--n", 3, "--individual", tmp_path / "keys") == 0
    keys = [pixels(tmp_path / "keys" / f"seed2-{i:05d}.png") for i in range(3)]
    common = ["--seed", 2, "--keyframes", 3, "--steps", 4]
    assert cli("interpolate", ckpt, *common, "--out", tmp_path / "walk.gif") == 0
    gif = Image.open(tmp_path / "walk.gif")
    assert gif.n_frames == 12 and gif.size == (16, 16)
    gif.seek(0)
    first = np.asarray(gif.convert("RGB")).astype(int)
    assert np.abs(first - keys[0]).max() <= 16  # GIF palette quantisation only
    assert cli("interpolate", ckpt, *common, "--out", tmp_path / "frames") == 0
    frames = sorted((tmp_path / "frames").glob("frame-*.png"))
    assert len(frames) == 12
    for k in range(3):
        assert np.array_equal(pixels(frames[4 * k]), keys[k])
    assert not np.array_equal(pixels(frames[1]), keys[0])


def test_interpolation_mp4_or_a_clear_message(tmp_path, ckpt, capsys):
    out = tmp_path / "walk.mp4"
    rc = cli("interpolate", ckpt, "--steps", 3, "--keyframes", 2, "--out", out)
    if importlib.util.find_spec("av") is None:
        said = capsys.readouterr().err
        assert rc == 2 and "pip install 'progan-pipeline[video]'" in said and not out.exists()
        return
    import av

    assert rc == 0
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 6


# -- edit -------------------------------------------------------------------------------------


def test_edit_strength_zero_reproduces_targets_and_others_change(tmp_path, ckpt):
    assert cli("generate", ckpt, "--n", 8, "--nrow", 8, "--out", tmp_path / "sheet.png") == 0
    sheet = pixels(tmp_path / "sheet.png")
    edit = ["--n", 8, "--targets", "0,5", "--strengths", "-3,0,3", "--out", tmp_path / "e.png"]
    direction = tmp_path / "dir.npy"
    assert cli("edit", ckpt, "--with", "1,2,3", *edit, "--save-direction", direction) == 0
    grid = pixels(tmp_path / "e.png")
    assert grid.shape == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2, 3)
    for row, target in enumerate((0, 5)):
        assert np.array_equal(cell(grid, row, 1, 16, 16), cell(sheet, 0, target, 16, 16))
        assert not np.array_equal(cell(grid, row, 0, 16, 16), cell(grid, row, 1, 16, 16))
        assert not np.array_equal(cell(grid, row, 2, 16, 16), cell(grid, row, 1, 16, 16))
    saved = torch.from_numpy(np.load(direction))
    torch.testing.assert_close(saved, latent_direction(sample_latents(0, [1, 2, 3], 16)))
    assert cli("edit", ckpt, "--direction-from", direction, *edit[:-1], tmp_path / "f.png") == 0
    assert np.array_equal(pixels(tmp_path / "f.png"), grid)


def test_edit_without_and_bad_requests(tmp_path, ckpt, capsys):
    with_, without = sample_latents(0, [1, 2], 16), sample_latents(0, [4], 16)
    d = latent_direction(with_, without)
    expected = F.normalize(
        F.normalize(with_.mean(0), dim=0) - F.normalize(without[0], dim=0), dim=0
    )
    torch.testing.assert_close(d, expected)
    assert d.norm().item() == pytest.approx(1.0)
    out = tmp_path / "e.png"
    assert cli("edit", ckpt, "--with", "1,2", "--without", "4", "--out", out) == 0
    assert Image.open(out).size == (5 * 16 + 6 * 2, 4 * 16 + 5 * 2)  # 4 default targets
    assert cli("edit", ckpt, "--with", "9", "--n", 8, "--out", out) == 2
    assert "--with index 9 is not on a sheet of --n 8" in capsys.readouterr().err
    assert cli("edit", ckpt, "--out", out) == 2
    assert "exactly one of --with" in capsys.readouterr().err
    torch.save(torch.randn(3, 5), tmp_path / "wrong.pt")
    assert cli("edit", ckpt, "--direction-from", tmp_path / "wrong.pt", "--out", out) == 2
    assert "expected [N, 16] latents" in capsys.readouterr().err


# -- export -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated")
def test_torchscript_export_reproduces_the_eager_generator(tmp_path, ckpt, capsys):
    out = tmp_path / "g.ts.pt"
    assert cli("export", ckpt, "--format", "torchscript", "--out", out) == 0
    assert "max |eager - exported|" in capsys.readouterr().out
    extra = {"progan.json": ""}
    model = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["progan.json"])["resolution"] == "16"
    gen = load_generator(ckpt)
    z = gen.latents(11, 5)
    torch.testing.assert_close(model(z), gen.render(z).clamp(-1, 1), rtol=0, atol=1e-5)


@pytest.mark.skipif(not ONNX_READY, reason="onnx, onnxscript and onnxruntime not installed")
def test_onnx_export_reproduces_the_eager_generator(tmp_path, ckpt):
    import onnxruntime

    out = tmp_path / "g.onnx"
    assert cli("export", ckpt, "--format", "onnx", "--out", out) == 0
    gen = load_generator(ckpt)
    z = gen.latents(11, 5)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (image,) = session.run(["image"], {"z": z.numpy()})
    torch.testing.assert_close(
        torch.from_numpy(image), gen.render(z).clamp(-1, 1), atol=1e-4, rtol=0
    )


def test_optional_tools_without_their_extra_say_what_to_install(
    tmp_path, ckpt, capsys, monkeypatch
):
    # the extras are installed here: their absence is simulated (find_spec / import fail)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a),
    )
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    assert cli("export", ckpt, "--format", "onnx", "--out", tmp_path / "g.onnx") == 2
    said = capsys.readouterr().err
    assert "needs onnxruntime (not installed)" in said
    assert "pip install 'progan-pipeline[export]'" in said
    out = tmp_path / "walk.mp4"
    assert cli("interpolate", ckpt, "--steps", 3, "--keyframes", 2, "--out", out) == 2
    assert "pip install 'progan-pipeline[video]'" in capsys.readouterr().err
    assert not out.exists()


def test_size_is_width_by_height():
    assert parse_size("178x218") == (218, 178)
    for bad in ("178", "0x5", "ax3", "3x4x5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
