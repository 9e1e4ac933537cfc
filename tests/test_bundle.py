"""`progan export --format bundle`: safetensors + config + model card, loadable by the card's
stand-alone loader in a fresh process with torch and safetensors only, never unpickling,
and giving `progan generate`'s images pixel for pixel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.phases.checkpoints import export_generator
from progan.trainer import GANTrainer
from tests.helpers import run_steps, tiny_config


def trained_run(folder: Path, steps: int) -> Path:
    """generator.pt of a tiny trainer after `steps` steps (a mid-fade-in one at 10)."""
    trainer = GANTrainer(tiny_config(model={"resolution": 16}))
    run_steps(trainer, steps)
    phase = trainer.point.phase
    export_generator(trainer.state_dict(), phase, folder / "generator.pt")
    return folder / "generator.pt"


@pytest.fixture(scope="module", params=["end", "fading"])
def generator_file(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "end":  # the plan's end: 16x16, alpha 1
        trainer = GANTrainer(tiny_config(model={"resolution": 16}))
        run_steps(trainer, 3)
        trainer.images_shown = trainer.plan[-1].end_images
        export_generator(trainer.state_dict(), trainer.plan[-1], folder / "generator.pt")
        return folder / "generator.pt"
    return trained_run(folder, 10)  # 2 steps into the 8x8 fade-in: alpha in (0, 1)


# The card's loader, run as a stranger would: a fresh interpreter, this project not on the
# path, pickle made to fail (nothing may be unpickled), then every image of seed 7.
STRANGER = """
import pickle, sys
sys.path = [p for p in sys.path if p not in ("", {repo!r})]
def refuse(*a, **k):
    raise AssertionError("the bundle loader unpickled something")
pickle.load = pickle.loads = refuse
pickle.Unpickler = refuse
sys.path.insert(0, {bundle!r})
from progan_bundle import load_bundle, latents, to_uint8
generate, cfg = load_bundle({bundle!r})
images = to_uint8(generate(latents(7, 6, cfg["latent_size"]), psi={psi}))
import numpy
numpy.save({out!r}, images.numpy())
mods = sorted(m for m in sys.modules if m.split(".")[0] in ("progan", "pipeline", "mlflow", "ray"))
print("MODULES", mods)
"""


@pytest.mark.parametrize("psi", [1.0, 0.6])
def test_the_cards_loader_gives_progan_generates_pixels_without_the_project(
    generator_file, tmp_path, psi
):
    bundle = tmp_path / "bundle"
    assert main(["export", str(generator_file), "--format", "bundle", "--out", str(bundle)]) == 0
    assert sorted(p.name for p in bundle.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "progan_bundle.py",
        "samples.png",
    ]
    faces = tmp_path / "faces"
    args = ["--seed", "7", "--n", "6", "--truncation", str(psi), "--individual", str(faces)]
    assert main(["generate", str(generator_file), *args]) == 0
    expected = np.stack([np.asarray(Image.open(p)) for p in sorted(faces.glob("*.png"))])

    out = tmp_path / "stranger.npy"
    repo = str(Path(__file__).resolve().parents[1])
    code = STRANGER.format(repo=repo, bundle=str(bundle), psi=psi, out=str(out))
    ran = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "MODULES []" in ran.stdout, ran.stdout  # torch, safetensors, numpy: nothing of ours
    assert np.array_equal(np.load(out), expected)

    # `progan generate BUNDLE` reads it too (safetensors, no pickle), with the same pixels
    again = tmp_path / "again"
    assert main(["generate", str(bundle), *args[:-1], str(again)]) == 0
    for a, b in zip(sorted(again.glob("*.png")), sorted(faces.glob("*.png")), strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_the_card_says_what_the_generator_is(generator_file, tmp_path):
    bundle = tmp_path / "bundle"
    licence = "CC0 (made up for the test)"
    argv = ["export", str(generator_file), "--format", "bundle", "--out", str(bundle)]
    assert main([*argv, "--data-licence", licence]) == 0
    config = json.loads((bundle / "config.json").read_text())
    card = (bundle / "README.md").read_text()
    res = config["resolution"]
    assert f"# ProGAN face generator, {res}x{res}" in card
    assert f"| images shown in training | {config['images_shown']:,}" in card
    assert f"| licence of the data | {licence} |" in card
    assert "from progan_bundle import load_bundle" in card and "![16 faces" in card
    assert (bundle / "progan_bundle.py").read_text() in card  # the loader, in full


def test_a_dcgan_is_refused_in_one_line(tmp_path, capsys):
    trainer = GANTrainer(tiny_config(model={"arch": "dcgan", "resolution": 8, "dcgan_width": 8}))
    trainer.images_shown = trainer.plan[-1].end_images
    export_generator(trainer.state_dict(), trainer.plan[-1], tmp_path / "generator.pt")
    argv = ["export", str(tmp_path / "generator.pt"), "--format", "bundle", "--out", "b"]
    assert main(argv) == 2
    assert "only ProGAN generators" in capsys.readouterr().err
