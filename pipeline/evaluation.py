"""Evaluate a generator against a prepared dataset: SWD, MS-SSIM, FID, KID.

One function serves the end-of-phase evaluation in the Ray workers and `progan evaluate`.
Real-side statistics (SWD descriptors, Inception features) are cached per dataset
fingerprint, resolution and image count, so each evaluation only computes the fake side.
The real images are a fixed random subset (seeded) of the resolution's LMDB.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from preprocessing.lmdb_store import LmdbImageDataset, read_manifest
from progan.metrics import (
    MSSSIMDiversity,
    SWDCacheKey,
    SWDDescriptors,
    extract_features,
    fid_from_features,
    kid_from_features,
    load_fid_inception,
    load_or_compute_real_descriptors,
    load_or_compute_real_features,
    swd,
    swd_real_floor,
)
from progan.metrics.catalogue import CATALOGUE, METRIC_NAMES, measured_at
from progan.networks import Alpha
from progan.sampling import fixed_latents, generate

BATCH = 64
MIN_IMAGES = 8  # fewer real images than this give no usable statistic


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked (unknown metric, no FID weights...)."""


def real_batches(
    dataset_dir: str | Path, resolution: int, n: int, seed: int, batch: int = BATCH
) -> Iterator[torch.Tensor]:
    """n real images (uint8) of `resolution` in a seeded random order, batch by batch."""
    data = LmdbImageDataset(dataset_dir, resolution)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    for chunk in order.split(batch):
        yield torch.stack([data[int(i)] for i in chunk])


def fake_batches(
    G: nn.Module, level: int, alpha: Alpha, n: int, latent_size: int, seed: int
) -> Iterator[torch.Tensor]:
    """n generated images in [-1, 1] from seeded latents, batch by batch (on the CPU)."""
    z = fixed_latents(n, latent_size, seed=seed)
    for chunk in z.split(BATCH):
        yield generate(G, chunk, level, alpha, batch_size=BATCH)


def latent_size_of(G: nn.Module) -> int:
    """The generator's latent size (ProGAN and DCGAN generators both carry it)."""
    module = G.module if hasattr(G, "module") else G  # DDP
    if not hasattr(module, "latent_size"):
        raise EvaluationError(f"{type(module).__name__} has no latent_size")
    return int(module.latent_size)


def check_metrics(metrics: Sequence[str], fid_weights: str | None) -> None:
    """Fail early, in one line, for an unknown metric or FID/KID without a weights file."""
    unknown = [m for m in metrics if m not in CATALOGUE]
    if unknown:
        raise EvaluationError(f"unknown metric(s) {unknown}; allowed: {', '.join(METRIC_NAMES)}")
    if any(CATALOGUE[m].needs_inception for m in metrics):
        try:
            load_fid_inception(fid_weights)
        except (FileNotFoundError, ValueError) as err:
            raise EvaluationError(str(err)) from err


def evaluate_generator(
    G: nn.Module,
    level: int,
    alpha: Alpha,
    dataset_dir: str | Path,
    resolution: int,
    *,
    metrics: Sequence[str] = ("swd",),
    num_images: int = 512,
    fid_weights: str | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    latent_size: int | None = None,
) -> dict[str, float]:
    """The chosen metrics of G (at `level`, `alpha`) against the dataset at `resolution`.

    Keys: ``SWDx1e3_<res>``/``SWDx1e3_avg`` and the real-vs-real floor
    ``SWDx1e3_avg_real_floor``; ``msssim_fake``/``msssim_real`` (lower = more diverse);
    ``fid``; ``kid``/``kid_std``; ``eval_images`` and ``eval_seconds``. Metrics a resolution
    is too small for are left out (progan.metrics.catalogue: SWD below 8x8, MS-SSIM below
    16x16).
    """
    check_metrics(metrics, fid_weights)
    started = time.perf_counter()
    n = min(num_images, len(LmdbImageDataset(dataset_dir, resolution)))
    if n < MIN_IMAGES:
        raise EvaluationError(f"{dataset_dir} has only {n} images at {resolution}x{resolution}")
    n -= n % 2  # SWD halves and MS-SSIM pairs
    manifest = read_manifest(dataset_dir)
    fingerprint = f"{manifest.get('fingerprint', Path(dataset_dir).resolve())}"
    cache = Path(cache_dir) if cache_dir is not None else Path(dataset_dir) / "metrics-cache"
    if device is not None:
        G = G.to(device)
    z_size = latent_size or latent_size_of(G)

    def reals() -> Iterator[torch.Tensor]:
        return real_batches(dataset_dir, resolution, n, seed)

    def fakes() -> Iterator[torch.Tensor]:
        return fake_batches(G, level, alpha, n, z_size, seed + 1)

    out: dict[str, float] = {}
    wanted = [m for m in metrics if measured_at(m, resolution)]
    if "swd" in wanted:
        out.update(_swd(reals, fakes, fingerprint, resolution, n, seed, cache))
    if "msssim" in wanted:
        out.update(_msssim(reals, fakes))
    if {"fid", "kid"} & set(wanted):
        out.update(
            _inception(metrics, reals, fakes, fingerprint, resolution, n, fid_weights, cache)
        )
    out["eval_images"] = float(n)
    out["eval_seconds"] = time.perf_counter() - started
    return out


def _swd(reals, fakes, fingerprint, resolution, n, seed, cache) -> dict[str, float]:
    min_res = min(16, resolution)
    key = SWDCacheKey(dataset=fingerprint, resolution=resolution, n_images=n, seed=seed)
    real = load_or_compute_real_descriptors(cache, key, reals, min_resolution=min_res)
    fake = SWDDescriptors(resolution, seed=seed, min_resolution=min_res, storage_device="cpu")
    for batch in fakes():
        fake.update(batch)
    result = swd(real, fake)
    result["SWDx1e3_avg_real_floor"] = swd_real_floor(real)["SWDx1e3_avg"]
    return result


def _msssim(reals, fakes) -> dict[str, float]:
    out = {}
    for name, batches in (("msssim_fake", fakes), ("msssim_real", reals)):
        acc = MSSSIMDiversity()
        for batch in batches():
            acc.update(batch)
        out[name] = acc.compute()["mean"]
    return out


def _inception(metrics, reals, fakes, fingerprint, resolution, n, weights, cache):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inception = load_fid_inception(weights).to(device)
    key = {"dataset": fingerprint, "resolution": resolution, "extractor": Path(weights).name}
    real_f = load_or_compute_real_features(cache, key, inception, reals, n_images=n)
    fake_f = extract_features(inception, fakes(), max_images=n)
    out = {}
    if "fid" in metrics:
        out["fid"] = fid_from_features(real_f, fake_f)
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kid_from_features(real_f, fake_f)
    return out
