"""SWD (progan.metrics.swd): against float64 references written from the definition, its
basic properties (zero on itself, monotone in blur and colour jitter) and the real cache."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from progan.metrics import (
    SWDCacheKey,
    SWDDescriptors,
    laplacian_pyramid,
    load_or_compute_real_descriptors,
    sliced_wasserstein,
    swd,
    swd_real_floor,
)

BINOMIAL_5X5 = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0


def structured_images(n: int, res: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour fields plus edges and a little fine noise, uint8 [n, 3, res, res]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, res // 8, res // 8, generator=g)
    img = F.interpolate(coarse, size=(res, res), mode="bicubic", align_corners=False)
    img = img + 0.3 * (torch.rand(n, 1, res, res, generator=g) > 0.8).float()
    img = img + 0.05 * torch.randn(n, 3, res, res, generator=g)
    return (img.clamp(0, 1) * 200 + 25).round().to(torch.uint8)


def quick_swd(real: SWDDescriptors, fake: SWDDescriptors) -> float:
    """Mean SWD with one repeat of 128 directions (instead of 4): enough for the ordering
    properties below and 4x faster; the full default is checked against the reference."""
    return swd(real, fake, dir_repeats=1)["SWDx1e3_avg"]


def descriptors(images: torch.Tensor, seed: int = 0, **kw) -> SWDDescriptors:
    acc = SWDDescriptors(images.shape[-1], seed=seed, **kw)
    acc.update(images)
    return acc


def ref_pyramid(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """Laplacian pyramid in float64 with scipy (mirror borders), as cv2.pyrDown/pyrUp."""
    k = BINOMIAL_5X5[None, None]
    out = [x.astype(np.float64)]
    for _ in range(levels - 1):
        down = scipy.ndimage.convolve(out[-1], k, mode="mirror")[:, :, ::2, ::2]
        up = np.zeros_like(out[-1])
        up[:, :, ::2, ::2] = down
        out[-1] = out[-1] - scipy.ndimage.convolve(up, 4 * k, mode="mirror")
        out.append(down)
    return out


def ref_sliced_wasserstein(a: np.ndarray, b: np.ndarray, dirs: list[np.ndarray]) -> float:
    """Per-channel normalisation of each set, then mean |sorted(a.d) - sorted(b.d)|."""

    def normalise(d: np.ndarray) -> np.ndarray:
        d = d - d.mean(axis=(0, 2, 3), keepdims=True)
        return (d / d.std(axis=(0, 2, 3), keepdims=True)).reshape(len(d), -1)

    a, b = normalise(a.astype(np.float64)), normalise(b.astype(np.float64))
    per_repeat = []
    for d in dirs:
        d = d / np.linalg.norm(d, axis=0, keepdims=True)
        per_repeat.append(np.abs(np.sort(a @ d, axis=0) - np.sort(b @ d, axis=0)).mean())
    return float(np.mean(per_repeat))


def test_pyramid_matches_scipy_reference():
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64) * 255
    ours = laplacian_pyramid(x, 2)
    ref = ref_pyramid(x.numpy(), 2)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-9)


def test_descriptors_are_7x7_windows_of_the_reference_pyramid():
    images = structured_images(2, 32)
    acc = descriptors(images, nhoods_per_image=8)
    ref = ref_pyramid(images.numpy(), 2)
    for level, ref_level in zip(acc.levels(), ref, strict=True):
        assert level.shape == (2 * 8, 3, 7, 7)
        for i, patch in enumerate(level.double().numpy()):
            img = ref_level[i // 8]
            size = img.shape[-1]
            windows = [
                img[:, y : y + 7, x : x + 7] for y in range(size - 6) for x in range(size - 6)
            ]
            err = min(np.abs(w - patch).max() for w in windows)
            assert err < 1e-3, f"patch {i} is no window of its image (error {err})"


def test_sliced_wasserstein_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 3, 7, 7, generator=g) * 30 + 100
    b = torch.randn(500, 3, 7, 7, generator=g) ** 3 * 20 + 90
    ours = sliced_wasserstein(
        a, b, dir_repeats=3, dirs_per_repeat=40, generator=torch.Generator().manual_seed(7)
    )
    replay = torch.Generator().manual_seed(7)
    dirs = [torch.randn(147, 40, generator=replay, dtype=torch.float64).numpy() for _ in range(3)]
    ref = ref_sliced_wasserstein(a.numpy(), b.numpy(), dirs)
    assert ours == pytest.approx(ref, rel=1e-4)
    assert ref > 0.05


def test_swd_of_a_set_with_itself_is_zero_and_batching_does_not_matter():
    images = structured_images(24, 32)
    whole = descriptors(images)
    streamed = SWDDescriptors(32)
    for batch in images.split(7):
        streamed.update(batch)
    assert streamed.n_images == 24
    for a, b in zip(whole.levels(), streamed.levels(), strict=True):
        assert torch.equal(a, b)
    result = swd(whole, streamed)
    assert set(result) == {"SWDx1e3_32", "SWDx1e3_16", "SWDx1e3_avg"}
    assert result["SWDx1e3_avg"] == pytest.approx(0.0, abs=1e-9)


def test_uint8_and_float_inputs_give_the_same_descriptors():
    images = structured_images(4, 32)
    as_float = images.float() / 127.5 - 1.0
    for a, b in zip(descriptors(images).levels(), descriptors(as_float).levels(), strict=True):
        assert torch.equal(a, b)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    blurred = scipy.ndimage.gaussian_filter(images.float().numpy(), (0, 0, sigma, sigma))
    return torch.from_numpy(blurred).round().clamp(0, 255).to(torch.uint8)


def test_swd_grows_with_blur():
    images = structured_images(32, 32)
    real = descriptors(images)
    values = [quick_swd(real, descriptors(_gaussian_blur(images, s))) for s in (0.5, 1, 2, 3)]
    assert all(lo < hi for lo, hi in itertools.pairwise(values)), values
    assert values[0] > 0


def test_swd_grows_with_per_image_colour_jitter():
    images = structured_images(32, 32)
    offsets = torch.randn(32, 3, 1, 1, generator=torch.Generator().manual_seed(3))
    real = descriptors(images)
    values = []
    for amount in (5, 15, 30, 60):
        shifted = (images.float() + amount * offsets).round().clamp(0, 255).to(torch.uint8)
        values.append(quick_swd(real, descriptors(shifted)))
    assert all(lo < hi for lo, hi in itertools.pairwise(values)), values


def test_global_colour_shift_is_invisible_by_design():
    """Each set is normalised per channel, so a uniform per-channel offset (without
    clipping) cancels out: documented in docs/metrics.md."""
    images = structured_images(16, 32)
    shifted = images.clone()
    shifted[:, 0] += 20  # values stay below 255, no clipping
    assert quick_swd(descriptors(images), descriptors(shifted)) < 1e-2


def test_real_floor_splits_images_into_disjoint_halves():
    images = structured_images(32, 32)
    real = descriptors(images)
    first, second = real.split()
    assert first.n_images == second.n_images == 16
    assert torch.equal(first.levels()[0], descriptors(images[:16]).levels()[0])
    assert not torch.equal(first.levels()[0], second.levels()[0])
    floor = swd_real_floor(real, dir_repeats=1)["SWDx1e3_avg"]
    noise = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    assert 0 < floor < quick_swd(first, descriptors(noise))


def test_swd_refuses_sets_of_different_sizes():
    images = structured_images(6, 32)
    with pytest.raises(ValueError, match="must match"):
        swd(descriptors(images), descriptors(images[:4]))


def test_real_descriptor_cache_computes_once_per_key(tmp_path):
    images = structured_images(12, 32)
    calls = []

    def batches():
        calls.append(1)
        yield from images.split(5)

    key = SWDCacheKey(dataset="synthetic-v1", resolution=32, n_images=10, seed=0)
    first = load_or_compute_real_descriptors(tmp_path, key, batches)
    second = load_or_compute_real_descriptors(tmp_path, key, batches)
    assert len(calls) == 1
    assert first.n_images == second.n_images == 10
    for a, b in zip(first.levels(), second.levels(), strict=True):
        assert torch.equal(a, b)
    fake = descriptors(images[:10])
    assert swd(first, fake) == swd(second, fake)

    load_or_compute_real_descriptors(tmp_path, SWDCacheKey("synthetic-v1", 32, 10, 1), batches)
    load_or_compute_real_descriptors(tmp_path, SWDCacheKey("synthetic-v2", 32, 10, 0), batches)
    assert len(calls) == 3
    for path in tmp_path.iterdir():  # every cache file loads without pickle code execution
        torch.load(path, weights_only=True)


def test_real_descriptor_cache_needs_enough_images(tmp_path):
    key = SWDCacheKey(dataset="tiny", resolution=32, n_images=10)
    with pytest.raises(ValueError, match="10 needed"):
        load_or_compute_real_descriptors(tmp_path, key, lambda: [structured_images(4, 32)])


def test_unwritable_cache_costs_only_the_caching(tmp_path):
    """A read-only dataset (its metrics-cache cannot be created) still gets evaluated."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the cache directory would go")
    images = structured_images(10, 32)
    key = SWDCacheKey(dataset="read-only", resolution=32, n_images=10)
    with pytest.warns(UserWarning, match="not cached"):
        real = load_or_compute_real_descriptors(blocked / "cache", key, lambda: images.split(4))
    assert swd(real, descriptors(images))["SWDx1e3_avg"] == pytest.approx(0.0, abs=1e-6)
    assert blocked.read_text().startswith("a file")
