"""The one checkpoint layout of every phase host, and the one generator export.

A checkpoint is a directory named `images-NNNNNNNNN` (images shown) holding:

    state.pt               the full trainer state (progan.checkpoint: tensors and plain values
                           only) and, under "host", the host's own bookkeeping (a Tune trial's
                           lineage, train-local's clocks)
    samples/NNNNNNNNN.png  the sample grid of the fixed latents at that point
    generator.pt           at a phase's end, or where training stopped: the EMA generator

Ray Train and Tune keep these directories in their storage; train-local keeps the latest
`run.keep_checkpoints` of them in `<out>/checkpoints/`. `generator.pt` is written here only
(`export_generator`), and a run directory's or output folder's copy is this file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from progan.checkpoint import load_checkpoint, save_checkpoint
from progan.schedule import Phase

STATE_FILE = "state.pt"
GENERATOR_FILE = "generator.pt"
SAMPLES_DIR = "samples"
HOST_KEY = "host"  # the host's bookkeeping inside state.pt
PREFIX = "images-"
# What generator.pt holds: the EMA generator, its config, and where it stands.
GENERATOR_KEYS = (
    "config",
    "G_ema",
    "images_shown",
    "phase_index",
    "phase_name",
    "resolution",
    "alpha",
)


class CheckpointFormatError(RuntimeError):
    """A folder written by an older progan layout: it cannot be continued, only re-run."""


def checkpoint_name(images_shown: int) -> str:
    """`images-000004096`: the directory name of a checkpoint at that many images."""
    return f"{PREFIX}{images_shown:09d}"


def sample_grid_path(directory: Path, images_shown: int) -> Path:
    """Where a checkpoint directory keeps its sample grid."""
    return directory / SAMPLES_DIR / f"{images_shown:09d}.png"


def generator_state(state: dict[str, Any], phase: Phase) -> dict[str, Any]:
    """generator.pt's content from a full trainer state: where the generator stands is the
    phase just trained (at a phase's last image the trainer's own position is already the
    next phase), at that phase's alpha."""
    shown = int(state["images_shown"])
    where = {
        "phase_index": phase.index,
        "phase_name": phase.name,
        "resolution": phase.resolution,
        "alpha": phase.alpha_at(shown),
    }
    return {**{k: state[k] for k in GENERATOR_KEYS if k not in where}, **where}


def export_generator(state: dict[str, Any], phase: Phase, path: Path) -> Path:
    """Write generator.pt (atomically) from a full trainer state in `phase`."""
    return save_checkpoint(generator_state(state, phase), path)


def read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of a checkpoint directory on this machine, loaded to CPU
    (`GANTrainer.load_state_dict` places the tensors)."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file() and (directory / "trial.json").is_file():
        raise CheckpointFormatError(
            f"{directory} is a Tune checkpoint of an older progan (trial.json); start a new sweep"
        )
    return load_checkpoint(directory / STATE_FILE)


def load_training_state(source: Any) -> dict[str, Any]:
    """A full trainer state from a checkpoint directory: a local path, a storage URI
    (s3://, gs://, file://), or a Ray Train / Tune `Checkpoint`."""
    if hasattr(source, "as_directory"):  # ray.train.Checkpoint (Tune's is the same class)
        with source.as_directory() as d:
            return read_state(d)
    text = str(source)
    if "://" not in text:
        return read_state(text)
    import ray.train  # remote storage: Ray downloads it

    with ray.train.Checkpoint(text).as_directory() as d:
        return read_state(d)


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint directory with the most images in `folder`, if any."""
    found = sorted(p for p in folder.glob(f"{PREFIX}*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None
