"""Sampling tools: fixed latents, resize, grids, interpolation, direction editing."""

import pytest
import torch
from PIL import Image

from progan.networks import Generator
from progan.sampling import (
    edit_latents,
    fixed_latents,
    generate,
    interpolation_path,
    latent_direction,
    save_grid,
    slerp,
    to_uint8,
)
from tests.helpers import tiny_config


def test_fixed_latents_are_reproducible():
    torch.testing.assert_close(fixed_latents(4, 16, seed=7), fixed_latents(4, 16, seed=7))
    assert not torch.equal(fixed_latents(4, 16, seed=7), fixed_latents(4, 16, seed=8))


def test_generate_any_size_and_save_grid(tmp_path):
    g = Generator(tiny_config().model)
    images = generate(g, fixed_latents(6, 16), size=(218, 178), batch_size=4)
    assert images.shape == (6, 3, 218, 178)
    assert to_uint8(images).dtype == torch.uint8
    path = save_grid(images, tmp_path / "grid.png", nrow=3)
    assert Image.open(path).size == (3 * 178 + 4 * 2, 2 * 218 + 3 * 2)


def test_slerp_endpoints_and_norm():
    z0, z1 = torch.randn(3, 64), torch.randn(3, 64)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1, rtol=1e-5, atol=1e-5)
    u0, u1 = z0 / z0.norm(dim=1, keepdim=True), z1 / z1.norm(dim=1, keepdim=True)
    mid = slerp(u0, u1, 0.5)
    torch.testing.assert_close(mid.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(slerp(z0, z0, 0.3), z0)  # parallel: no NaN


def test_interpolation_path_frames():
    keys = torch.randn(3, 8)
    path = interpolation_path(keys, steps=4)
    assert path.shape == (9, 8)
    torch.testing.assert_close(path[0], keys[0])
    torch.testing.assert_close(path[4], keys[1])
    torch.testing.assert_close(path[-1], keys[2])
    assert interpolation_path(keys, steps=4, loop=True).shape == (12, 8)
    with pytest.raises(ValueError):
        interpolation_path(keys[:1], 4)


def test_direction_editing_adds_and_removes_the_normalised_mean():
    chosen = torch.randn(5, 16) + 3.0
    d = latent_direction(chosen)
    assert d.norm().item() == pytest.approx(1.0)
    torch.testing.assert_close(d, chosen.mean(0) / chosen.mean(0).norm())
    z = torch.randn(2, 16)
    rows = edit_latents(z, d, [-2.0, 0.0, 2.0])
    assert rows.shape == (6, 16)
    torch.testing.assert_close(rows[1], z[0])
    torch.testing.assert_close(rows[5] - rows[4], 2.0 * d)
