"""Builders for pipeline tests: a tiny prepared dataset and a tiny pipeline config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import PipelineConfig, merge, validate_config
from tests.helpers import disc_images


def make_tiny_dataset(root: Path, n: int = 48, resolution: int = 16) -> Path:
    """A prepared dataset (no face detection) of simple generated images, 4..resolution."""
    from preprocessing.prepare import prepare_dataset

    folder = root / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    images = ((disc_images(n, 32, seed=1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
    for i, img in enumerate(images.numpy()):
        Image.fromarray(np.ascontiguousarray(img)).save(folder / f"{i:03d}.png")
    out = root / "dataset"
    prepare_dataset(folder, out, resolution, workers=1, detector="none")
    return out


def tiny_pipeline_config(dataset: Path, root: Path, **sections) -> PipelineConfig:
    """4x4 -> 8x8 (or more) with a few channels; checkpoints and logs every few steps."""
    raw = {
        "data": {"dataset": str(dataset)},
        "model": {"resolution": 8, "latent_size": 16, "fmap_base": 64, "fmap_max": 16},
        "schedule": {"transition_kimg": 0.096, "stabilize_kimg": 0.096, "batch_base": 8},
        "scaling": {"num_workers": 1},
        "run": {
            "root": str(root / "runs"),
            "checkpoint_every_kimg": 0.032,
            "log_every_kimg": 0.016,
            "sample_grid": 4,
        },
        "eval": {"enabled": False},
    }
    return validate_config(merge(raw, sections))
