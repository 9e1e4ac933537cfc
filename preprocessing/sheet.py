"""Contact sheet of a prepared dataset: one row of random records per resolution."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from preprocessing.lmdb_store import LmdbImageDataset, available_resolutions


def contact_sheet(
    dataset_dir: str | os.PathLike, out_png: str | os.PathLike, n: int = 16, seed: int = 0
) -> Path:
    """Write a PNG: for each resolution a row of the same n random records, shown at the
    largest resolution's size (nearest-neighbour), so alignment and the pyramid are visible."""
    resolutions = available_resolutions(dataset_dir)
    datasets = [LmdbImageDataset(dataset_dir, r) for r in resolutions]
    count = len(datasets[-1])
    if count == 0:
        raise ValueError(f"{dataset_dir} holds no records")
    indices = random.Random(seed).sample(range(count), min(n, count))
    display = max(resolutions[-1], 64)
    tiles = []
    for ds in datasets:
        for i in indices:
            img = ds[i].unsqueeze(0).float() / 255.0
            tiles.append(F.interpolate(img, size=(display, display), mode="nearest")[0])
    grid = make_grid(torch.stack(tiles), nrow=len(indices), padding=2, pad_value=1.0)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, out)
    return out
