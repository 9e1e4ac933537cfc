"""FID and KID from feature vectors (normally Inception pool3, see `progan.metrics.inception`).

* `extract_features` runs any feature extractor ``nn.Module`` batch by batch, so tests can use
  a tiny network and memory stays bounded by the batch size;
* FID (Heusel et al. 2017): ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64.
  ``Tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the
  symmetric ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), with round-off negatives
  clipped to 0, so there are no complex parts to discard and singular covariances are fine;
* KID (Binkowski et al. 2018): unbiased MMD^2 with the polynomial kernel
  ``k(x, y) = (gamma x.y + coef0)^degree`` (defaults d=3, gamma=1/dim, coef0=1) over random
  subsets, reported as mean and (population) std over subsets, like torch-fidelity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from progan.metrics.cache import load_or_compute


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    batches: Iterable[Tensor],
    *,
    max_images: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Run ``extractor`` over ``batches`` (on ``device``, default the extractor's) and return
    the features ``[N, D]`` as float32 on the CPU; stops after ``max_images`` images."""
    if device is None:
        param = next(extractor.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    feats: list[Tensor] = []
    seen = 0
    for batch in batches:
        if max_images is not None:
            batch = batch[: max_images - seen]
        if batch.shape[0] == 0:
            break
        feats.append(extractor(batch.to(device)).flatten(1).float().cpu())
        seen += batch.shape[0]
        if max_images is not None and seen >= max_images:
            break
    if not feats:
        raise ValueError("no images were given")
    return torch.cat(feats)


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features`` ``[N, D]``, float64."""
    x = features.double()
    mu = x.mean(dim=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _sqrt_psd(m: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    value = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return float(value)


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """FID between two feature sets ``[N, D]`` and ``[M, D]``."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def kid_from_features(
    real: Tensor,
    fake: Tensor,
    *,
    n_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over ``n_subsets``) between two feature sets; each subset draws
    ``min(subset_size, N, M)`` rows from each set without replacement."""
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_subsets):
        x = real[torch.randperm(real.shape[0], generator=gen)[:m]].double()
        y = fake[torch.randperm(fake.shape[0], generator=gen)[:m]].double()
        kxx = (gamma * x @ x.T + coef0) ** degree
        kyy = (gamma * y @ y.T + coef0) ** degree
        kxy = (gamma * x @ y.T + coef0) ** degree
        off_diag = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (
            m * (m - 1)
        )
        values.append(off_diag - 2 * kxy.mean())
    stacked = torch.stack(values)
    return stacked.mean().item(), stacked.std(unbiased=False).item()


def load_or_compute_real_features(
    cache_dir: str | Path,
    key: Mapping[str, Any],
    extractor: nn.Module,
    batches_fn: Callable[[], Iterable[Tensor]],
    *,
    n_images: int,
) -> Tensor:
    """Features of the first ``n_images`` real images, cached in ``cache_dir`` under ``key``
    (e.g. ``{"dataset": fingerprint, "resolution": 128, "extractor": "fid-inception"}``)."""

    def compute() -> dict[str, Any]:
        feats = extract_features(extractor, batches_fn(), max_images=n_images)
        if feats.shape[0] < n_images:
            raise ValueError(f"batches_fn yielded {feats.shape[0]} images, {n_images} needed")
        return {"features": feats}

    full_key = {**key, "n_images": n_images}
    return load_or_compute(cache_dir, "features-real", full_key, compute)["features"]
