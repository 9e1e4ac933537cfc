"""Sliced Wasserstein distance on Laplacian-pyramid patches, as in the ProGAN paper.

Follows the semantics of the official ``metrics/sliced_wasserstein.py`` of
tkarras/progressive_growing_of_gans (Karras et al. 2018, appendix D):

* Laplacian pyramid of the images (pixel values 0..255, see `progan.metrics.images`) built
  with the 5-tap binomial filter ``[1, 4, 6, 4, 1] / 16`` (mirror borders, like
  ``cv2.pyrDown``/``pyrUp``); one level per resolution from the image resolution down to
  16x16, the last level being the 16x16 low-pass image itself;
* from every level of every image, 128 random 7x7 neighbourhoods (3 channels, so 147 values),
  centres drawn uniformly so the patch lies inside the image;
* each descriptor set is normalised per channel (mean/std over all its descriptors and the
  7x7 positions), separately for the real and the fake set (``finalize_descriptors``);
* sliced Wasserstein-1 distance: ``dir_repeats`` times draw ``dirs_per_repeat`` random unit
  directions, project both sets, sort, average ``|a_i - b_i|``; average over the repeats;
  reported x1e3 per level and averaged over levels. The official defaults are 4 repeats of
  128 directions (512 projections in all, the "512 projections" of the paper).

Random draws use seeded ``torch.Generator`` s, one per pyramid level, so the descriptors do
not depend on how the images are split into batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from progan.metrics.cache import load_or_compute
from progan.metrics.images import to_pixels

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: Tensor, gain: float = 1.0) -> Tensor:
    """Separable 5x5 binomial filter (``gain`` x [1,4,6,4,1]^T[1,4,6,4,1] / 256), mirror border."""
    n, c, h, w = x.shape
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) / 16.0
    y = F.pad(x.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(y, (k * gain).view(1, 1, 1, 5))
    y = F.conv2d(y, k.view(1, 1, 5, 1))
    return y.reshape(n, c, h, w)


def pyr_down(x: Tensor) -> Tensor:
    """Blur then keep every second pixel (matches ``cv2.pyrDown``)."""
    return _blur(x)[:, :, ::2, ::2]


def pyr_up(x: Tensor) -> Tensor:
    """Insert zeros between pixels then blur with gain 4 (matches ``cv2.pyrUp``)."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _blur(up, gain=4.0)


def laplacian_pyramid(x: Tensor, num_levels: int) -> list[Tensor]:
    """Laplacian pyramid, finest level first; the last entry is the low-pass residual."""
    levels: list[Tensor] = []
    current = x
    for _ in range(num_levels - 1):
        down = pyr_down(current)
        levels.append(current - pyr_up(down))
        current = down
    levels.append(current)
    return levels


def pyramid_resolutions(resolution: int, min_resolution: int = 16) -> list[int]:
    """Resolutions of the SWD levels: ``resolution, resolution/2, ..., >= min_resolution``."""
    if resolution < min_resolution:
        raise ValueError(f"SWD needs images of at least {min_resolution}x{min_resolution}")
    out = []
    res = resolution
    while res >= min_resolution:
        out.append(res)
        if res % 2:
            break
        res //= 2
    return out


class SWDDescriptors:
    """Streaming accumulator of SWD patch descriptors for one image set.

    Feed image batches with `update` (uint8 0..255 or float [-1, 1], ``[N, 3, R, R]``); only
    the descriptors are kept (per level: ``[n_images * nhoods_per_image, 3, 7, 7]`` float32,
    about 75 KB per image and level), on ``storage_device`` (default: the images' device).
    """

    def __init__(
        self,
        resolution: int,
        *,
        nhoods_per_image: int = 128,
        nhood_size: int = 7,
        min_resolution: int = 16,
        seed: int = 0,
        storage_device: torch.device | str | None = None,
    ) -> None:
        self.resolution = resolution
        self.nhoods_per_image = nhoods_per_image
        self.nhood_size = nhood_size
        self.resolutions = pyramid_resolutions(resolution, min_resolution)
        if self.resolutions[-1] <= 2 * (nhood_size // 2):
            raise ValueError(f"{nhood_size}x{nhood_size} patches do not fit {self.resolutions}")
        self.storage_device = storage_device
        self.n_images = 0
        self._gens = [torch.Generator().manual_seed(seed * 1009 + i) for i in self.resolutions]
        self._chunks: list[list[Tensor]] = [[] for _ in self.resolutions]

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Add the descriptors of a batch of images."""
        if tuple(images.shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(
                f"expected {self.resolution}x{self.resolution} images, got {tuple(images.shape)}"
            )
        pixels = to_pixels(images)
        pyramid = laplacian_pyramid(pixels, len(self.resolutions))
        for level, gen, chunks in zip(pyramid, self._gens, self._chunks, strict=True):
            desc = self._sample_patches(level, gen)
            chunks.append(desc if self.storage_device is None else desc.to(self.storage_device))
        self.n_images += images.shape[0]

    def _sample_patches(self, level: Tensor, gen: torch.Generator) -> Tensor:
        n, _, h, _ = level.shape
        half = self.nhood_size // 2
        p = self.nhoods_per_image
        # One draw per batch (centres as (y, x) pairs, image-major): the stream of centres
        # then does not depend on how the images are split into batches.
        centres = torch.randint(half, h - half, (n, p, 2), generator=gen).to(level.device)
        cy, cx = centres[..., 0], centres[..., 1]
        off = torch.arange(-half, half + 1, device=level.device)
        img = torch.arange(n, device=level.device).view(n, 1, 1, 1, 1)
        chan = torch.arange(3, device=level.device).view(1, 1, 3, 1, 1)
        ys = (cy.view(n, p, 1, 1, 1) + off.view(1, 1, 1, -1, 1)).expand(n, p, 1, -1, 1)
        xs = (cx.view(n, p, 1, 1, 1) + off.view(1, 1, 1, 1, -1)).expand(n, p, 1, 1, -1)
        patches = level[img, chan, ys, xs]  # [n, p, 3, k, k]
        return patches.reshape(n * p, 3, self.nhood_size, self.nhood_size).contiguous()

    def levels(self) -> list[Tensor]:
        """The raw (not yet normalised) descriptors, one tensor per level, finest first."""
        for i, chunks in enumerate(self._chunks):
            if len(chunks) > 1:
                self._chunks[i] = [torch.cat(chunks)]
        if self.n_images == 0:
            raise ValueError("no images were added")
        return [chunks[0] for chunks in self._chunks]

    def split(self) -> tuple[SWDDescriptors, SWDDescriptors]:
        """Two disjoint halves by image (first half, second half), for the real-vs-real floor."""
        half = self.n_images // 2
        rows = half * self.nhoods_per_image
        levels = self.levels()
        first = [d[:rows] for d in levels]
        second = [d[rows : 2 * rows] for d in levels]
        return self._with_levels(first, half), self._with_levels(second, half)

    def _with_levels(self, levels: list[Tensor], n_images: int) -> SWDDescriptors:
        other = object.__new__(SWDDescriptors)
        other.__dict__.update(self.__dict__)
        other._chunks = [[d] for d in levels]
        other.n_images = n_images
        other._gens = []
        return other

    def state_dict(self) -> dict:
        """Tensors and ints only, so it can be saved and loaded with ``weights_only=True``."""
        return {
            "resolution": self.resolution,
            "nhoods_per_image": self.nhoods_per_image,
            "nhood_size": self.nhood_size,
            "resolutions": list(self.resolutions),
            "n_images": self.n_images,
            "levels": [d.cpu() for d in self.levels()],
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> SWDDescriptors:
        """Rebuild an accumulator (no further `update` calls) from `state_dict` output."""
        obj = cls(
            state["resolution"],
            nhoods_per_image=state["nhoods_per_image"],
            nhood_size=state["nhood_size"],
            min_resolution=state["resolutions"][-1],
        )
        return obj._with_levels(list(state["levels"]), state["n_images"])


def _channel_stats(desc: Tensor, chunk_rows: int = 65536) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std over descriptors and positions (float64 sums)."""
    total = torch.zeros(3, dtype=torch.float64, device=desc.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, desc.shape[0], chunk_rows):
        part = desc[start : start + chunk_rows]
        total += part.sum(dim=(0, 2, 3), dtype=torch.float64)
        total_sq += part.square().sum(dim=(0, 2, 3), dtype=torch.float64)
    count = desc.shape[0] * desc.shape[2] * desc.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-8)
    return mean, std


class _Normalised:
    """A descriptor set ``[M, 3, k, k]`` with its per-channel normalisation folded into the
    projection: ``((x - mean) / std) . d == x . (d / std) - (mean / std) . d``, so the
    normalised copy of the (large) set is never materialised."""

    def __init__(self, desc: Tensor) -> None:
        self.flat = desc.flatten(1)
        mean, std = _channel_stats(desc)
        per_value = desc[0].numel() // 3
        self.inv_std = (1.0 / std).repeat_interleave(per_value)  # [147] float64
        self.shift = (mean / std).repeat_interleave(per_value)

    def sorted_projections(self, dirs: Tensor) -> Tensor:
        """Projections onto the unit columns of ``dirs`` ([147, D], float64), each sorted:
        ``[D, M]``."""
        dirs = dirs.to(self.flat.device)
        weights = (dirs * self.inv_std[:, None]).float()
        offset = (self.shift @ dirs).float()
        proj = weights.T @ self.flat.T
        proj -= offset[:, None]
        return proj.sort(dim=1).values


@torch.no_grad()
def sliced_wasserstein(
    a: Tensor,
    b: Tensor,
    *,
    dir_repeats: int = 4,
    dirs_per_repeat: int = 128,
    generator: torch.Generator | None = None,
    dir_chunk: int = 32,
) -> float:
    """SWD between two raw descriptor sets ``[M, 3, k, k]``, each normalised per channel.

    Directions are processed ``dir_chunk`` at a time, so the extra memory is about
    ``2 * dir_chunk * M`` floats.
    """
    if a.shape != b.shape:
        raise ValueError(f"descriptor sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    norm_a, norm_b = _Normalised(a), _Normalised(b)
    results = []
    for _ in range(dir_repeats):
        dirs = torch.randn(a[0].numel(), dirs_per_repeat, generator=generator, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        total = 0.0
        for start in range(0, dirs_per_repeat, dir_chunk):
            part = dirs[:, start : start + dir_chunk]
            diff = norm_a.sorted_projections(part) - norm_b.sorted_projections(part)
            total += diff.abs_().sum(dtype=torch.float64).item()
        results.append(total / (dirs_per_repeat * a.shape[0]))
    return sum(results) / len(results)


def swd(
    real: SWDDescriptors,
    fake: SWDDescriptors,
    *,
    dir_repeats: int = 4,
    dirs_per_repeat: int = 128,
    seed: int = 0,
) -> dict[str, float]:
    """SWD x1e3 per level (``"SWDx1e3_<res>"``) and their mean (``"SWDx1e3_avg"``).

    Both sets must hold the same number of images (the distance compares sorted samples).
    """
    if real.resolutions != fake.resolutions or real.n_images != fake.n_images:
        raise ValueError(
            f"real ({real.n_images} images, levels {real.resolutions}) and fake "
            f"({fake.n_images} images, levels {fake.resolutions}) must match"
        )
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for res, da, db in zip(real.resolutions, real.levels(), fake.levels(), strict=True):
        dist = sliced_wasserstein(
            da, db, dir_repeats=dir_repeats, dirs_per_repeat=dirs_per_repeat, generator=gen
        )
        out[f"SWDx1e3_{res}"] = dist * 1e3
    out["SWDx1e3_avg"] = sum(out.values()) / len(real.resolutions)
    return out


def swd_real_floor(real: SWDDescriptors, **kwargs: int) -> dict[str, float]:
    """SWD between the two disjoint halves of the real set: the value a perfect generator
    would get with ``n_images / 2`` images per side. It is above the floor for ``n_images``
    per side (fewer samples give a noisier estimate), by much on a small set: 11.8 against
    7.6 for 2,000 CelebA photos (docs/quality.md, regime B)."""
    first, second = real.split()
    return swd(first, second, **kwargs)


@dataclass(frozen=True)
class SWDCacheKey:
    """What identifies a real-descriptor set: the data set, the resolution, how many images
    and the seed of the patch sampling. ``dataset`` is any string that changes when the data
    changes (e.g. the LMDB manifest's source fingerprint)."""

    dataset: str
    resolution: int
    n_images: int
    seed: int = 0


def load_or_compute_real_descriptors(
    cache_dir: str | Path,
    key: SWDCacheKey,
    batches_fn: Callable[[], Iterable[Tensor]],
    *,
    nhoods_per_image: int = 128,
    nhood_size: int = 7,
    min_resolution: int = 16,
) -> SWDDescriptors:
    """Real-image descriptors for ``key``, from ``cache_dir`` or computed and cached.

    ``batches_fn()`` is called only on a cache miss; it must yield at least
    ``key.n_images`` images (extra ones are ignored).
    """
    params = {"nhoods_per_image": nhoods_per_image, "nhood_size": nhood_size}
    params["min_resolution"] = min_resolution

    def compute() -> dict:
        acc = SWDDescriptors(key.resolution, seed=key.seed, storage_device="cpu", **params)
        for batch in batches_fn():
            remaining = key.n_images - acc.n_images
            if remaining <= 0:
                break
            acc.update(batch[:remaining])
        if acc.n_images < key.n_images:
            raise ValueError(f"batches_fn yielded {acc.n_images} images, {key.n_images} needed")
        return acc.state_dict()

    state = load_or_compute(cache_dir, "swd-real", {**asdict(key), **params}, compute)
    return SWDDescriptors.from_state_dict(state)
