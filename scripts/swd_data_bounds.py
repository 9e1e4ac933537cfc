"""What SWD can show on a small training set: the scores of two ideal "generators" made of
real photos, next to the real-vs-real floor that `progan evaluate` prints.

    .venv/bin/python scripts/swd_data_bounds.py runs/bench/celeba-2k-32 \\
        --reference runs/bench/celeba-10k-64 --resolution 32

TRAIN is the set a generator was trained on (e.g. 2,000 CelebA photos), REFERENCE a larger
set of the same kind holding it (e.g. all 10,000). Rows (SWD x1e3 per level and their
mean, the same descriptors, seeds and cache as `progan evaluate`):
- memoriser vs TRAIN: |TRAIN| photos drawn with replacement from TRAIN, i.e. a generator
  that reproduces the training photos exactly, against TRAIN (|TRAIN| each side);
- same photos vs TRAIN (where REFERENCE holds all of TRAIN): TRAIN's photos as REFERENCE
  holds them (its own resizing, e.g. 64 -> 32 instead of straight to 32): what that costs;
- held-out vs TRAIN: |TRAIN| photos of REFERENCE that are not in TRAIN (a generator that
  learnt faces, not these photos), against TRAIN;
- memoriser vs REFERENCE: |REFERENCE| draws from TRAIN against REFERENCE (|REFERENCE| each
  side): the best a generator that knows only TRAIN's photos can score there;
- the real-vs-real floor of each set (its two halves), as `progan evaluate` reports it.
Photos are matched by record key (the file name in the source).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.evaluation import BATCH, real_batches
from preprocessing.lmdb_store import LmdbImageDataset, read_manifest
from progan.metrics.swd import (
    SWDCacheKey,
    SWDDescriptors,
    load_or_compute_real_descriptors,
    swd,
    swd_real_floor,
)


def reals(dataset: Path, resolution: int) -> SWDDescriptors:
    """The evaluation's real descriptors of the whole set (cached as `progan evaluate` does)."""
    n = len(LmdbImageDataset(dataset, resolution))
    n -= n % 2
    key = SWDCacheKey(read_manifest(dataset)["fingerprint"], resolution, n, seed=0)
    return load_or_compute_real_descriptors(
        dataset / "metrics-cache",
        key,
        lambda: real_batches(dataset, resolution, n, 0),
        min_resolution=min(16, resolution),
    )


def descriptors(data: LmdbImageDataset, indices: Sequence[int], seed: int) -> SWDDescriptors:
    """Descriptors of the records `indices` (in that order), as fakes are described."""
    acc = SWDDescriptors(
        data.resolution, seed=seed, min_resolution=min(16, data.resolution), storage_device="cpu"
    )
    for start in range(0, len(indices), BATCH):
        acc.update(torch.stack([data[i] for i in indices[start : start + BATCH]]))
    return acc


def draws(count: int, population: int, seed: int) -> list[int]:
    """`count` indices drawn with replacement from range(population), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(population, (count,), generator=gen).tolist()


def rounded(result: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in result.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)
    train = LmdbImageDataset(args.train, args.resolution)
    ref = LmdbImageDataset(args.reference, args.resolution)
    train_keys = {train.key(i) for i in range(len(train))}
    held_out = [i for i in range(len(ref)) if ref.key(i) not in train_keys]
    same = [i for i in range(len(ref)) if ref.key(i) in train_keys]
    real_train, real_ref = (
        reals(args.train, args.resolution),
        reals(args.reference, args.resolution),
    )
    n_train, n_ref = real_train.n_images, real_ref.n_images
    if len(held_out) < n_train:
        raise SystemExit(f"{args.reference} holds only {len(held_out)} photos not in TRAIN")
    rows = {
        "memoriser vs train": (real_train, train, draws(n_train, len(train), 1)),
        "same photos vs train": (real_train, ref, same[:n_train]),
        "held-out vs train": (real_train, ref, held_out[:n_train]),
        "memoriser vs reference": (real_ref, train, draws(n_ref, len(train), 2)),
    }
    if len(same) < n_train:  # the reference does not hold every training photo
        del rows["same photos vs train"]
    for name, (real, data, indices) in rows.items():
        print(json.dumps({"row": name, **rounded(swd(real, descriptors(data, indices, 1)))}))
    for name, real in (("train", real_train), ("reference", real_ref)):
        print(json.dumps({"row": f"{name} floor (halves)", **rounded(swd_real_floor(real))}))


if __name__ == "__main__":
    main()
