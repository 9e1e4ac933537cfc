"""FID/KID (progan.metrics.fid) against float64 references and known cases, and loading the
FID Inception network from a weights file (progan.metrics.inception) without downloads."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from progan.metrics import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    FIDInceptionFeatures,
    build_fid_inception,
    extract_features,
    fid_from_features,
    kid_from_features,
    load_fid_inception,
    load_or_compute_real_features,
)


def ref_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula: scipy sqrtm of the covariance product, real part."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    return (torch.randn(n, dim, generator=g) @ mix) * scale + shift


def test_fid_is_zero_on_identical_features_and_matches_scipy():
    a = gaussian(600, 32, 0)
    b = gaussian(500, 32, 1, shift=0.3, scale=1.5)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    ours = fid_from_features(a, b)
    assert ours == pytest.approx(ref_fid(a.double().numpy(), b.double().numpy()), rel=1e-6)
    assert ours > 1.0


def test_fid_handles_rank_deficient_covariances():
    a, b = gaussian(20, 64, 0), gaussian(20, 64, 1, shift=0.1)  # fewer samples than dims
    value = fid_from_features(a, b)
    assert np.isfinite(value) and value > 0


def ref_linear_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(x, y) = x.y, written out: closed form via sums of vectors."""
    m = x.shape[0]
    x, y = x.double(), y.double()
    sx, sy = x.sum(0), y.sum(0)
    xx = (sx @ sx - (x * x).sum()) / (m * (m - 1))
    yy = (sy @ sy - (y * y).sum()) / (m * (m - 1))
    return float(xx + yy - 2 * (sx @ sy) / m**2)


def test_kid_with_linear_kernel_has_the_closed_form():
    x, y = gaussian(50, 8, 0), gaussian(50, 8, 1, shift=0.5)
    mean, std = kid_from_features(
        x, y, n_subsets=3, subset_size=50, degree=1, gamma=1.0, coef0=0.0
    )  # every subset is the whole set
    assert mean == pytest.approx(ref_linear_mmd(x, y), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def normal(n: int, dim: int, seed: int) -> torch.Tensor:
    """n draws from N(0, I), from their own seeded generator."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_kid_is_unbiased():
    """Same distribution: zero in expectation (negative values occur); linear kernel with
    a mean shift delta: E[MMD^2] = |delta|^2. Every draw is seeded: the bounds below are
    statistical (3 and 4 standard errors), so unseeded they would fail now and then."""
    dim = 8
    same = [kid_from_features(normal(200, dim, 2 * s), normal(200, dim, 2 * s + 1), n_subsets=10,
                              subset_size=100, seed=s)[0] for s in range(20)]  # fmt: skip
    assert min(same) < 0 < max(same)
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    delta = torch.full((dim,), 0.25)  # |delta|^2 = 0.5
    shifted = [
        kid_from_features(normal(100, dim, 100 + 2 * s), normal(100, dim, 101 + 2 * s) + delta,
                          n_subsets=1, subset_size=100, degree=1, gamma=1.0, coef0=0.0)[0]
        for s in range(40)
    ]  # fmt: skip
    assert np.mean(shifted) == pytest.approx(0.5, abs=4 * np.std(shifted) / np.sqrt(40))


def test_kid_cubic_kernel_separates_distributions():
    x = gaussian(300, 16, 0)
    near, _ = kid_from_features(x, gaussian(300, 16, 1), n_subsets=20, subset_size=100)
    far, _ = kid_from_features(x, gaussian(300, 16, 1, shift=1.0), n_subsets=20, subset_size=100)
    assert abs(near) < far


class TinyExtractor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255).mean(dim=(2, 3))


def test_extract_features_is_batch_wise_and_stops_at_max_images(tmp_path):
    torch.manual_seed(0)  # the extractor's initial weights
    net = TinyExtractor()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, 3, 16, 16), generator=g, dtype=torch.uint8)
    whole = extract_features(net, [images])
    assert whole.shape == (10, 4)
    torch.testing.assert_close(extract_features(net, images.split(3)), whole)
    torch.testing.assert_close(extract_features(net, images.split(4), max_images=7), whole[:7])

    calls = []

    def batches():
        calls.append(1)
        return images.split(4)

    key = {"dataset": "noise", "resolution": 16, "extractor": "tiny"}
    cached = load_or_compute_real_features(tmp_path, key, net, batches, n_images=9)
    again = load_or_compute_real_features(tmp_path, key, net, batches, n_images=9)
    assert len(calls) == 1
    assert torch.equal(cached, again)
    torch.testing.assert_close(cached, whole[:9])


def _forbid_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_fid_inception_loads_from_a_weights_file_and_matches_pytorch_fid(tmp_path, monkeypatch):
    import pytorch_fid.inception as pfi

    _forbid_downloads(monkeypatch)
    torch.manual_seed(0)  # the network's random weights
    net = build_fid_inception()
    path = tmp_path / FID_WEIGHTS_FILENAME
    torch.save(net.state_dict(), path)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)

    loaded = load_fid_inception(path)
    features = loaded(images)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, FIDInceptionFeatures(net)(images))

    # pytorch-fid's own wrapper, given the same weights instead of its download
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: net.state_dict())
    reference = pfi.InceptionV3([3]).eval()
    with torch.no_grad():
        expected = reference(images.float() / 255)[0].flatten(1)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_missing_or_wrong_weights_file_gives_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_fid_inception(tmp_path / "nothing.pth")
    assert FID_WEIGHTS_FILENAME in str(err.value) and FID_WEIGHTS_URL in str(err.value)
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_FILENAME):
        load_fid_inception(None)

    wrong = tmp_path / "tiny.pth"
    torch.manual_seed(0)
    torch.save(TinyExtractor().state_dict(), wrong)
    with pytest.raises(ValueError, match="does not match the FID Inception"):
        load_fid_inception(wrong)
