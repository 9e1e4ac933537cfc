"""Generator / discriminator: the paper's sizes, shapes per level, and the fade-in."""

import pytest
import torch

from progan.config import ModelConfig
from progan.layers import (
    EqualizedConv2d,
    conv_downsample,
    downsample,
    lrelu,
    upsample,
    upsample_conv,
)
from progan.networks import Discriminator, Generator, channels, fade_in_real

TINY = ModelConfig(resolution=32, latent_size=16, fmap_base=128, fmap_max=32)


def count(params) -> int:
    return sum(p.numel() for p in params)


def test_paper_channel_schedule():
    cfg = ModelConfig()
    assert [channels(cfg, lv) for lv in range(9)] == [512, 512, 512, 512, 256, 128, 64, 32, 16]


def test_paper_parameter_counts_at_1024():
    """Table 2 of the paper: 23.1M trainable parameters in each network at 1024x1024."""
    cfg = ModelConfig()
    g, d = Generator(cfg), Discriminator(cfg)
    n_g = count(g.active_parameters(8, fading=False))  # the 1024 path (one toRGB)
    n_d = count(d.active_parameters(8, fading=False))
    assert round(n_g / 1e6, 1) == 23.1, n_g
    assert round(n_d / 1e6, 1) == 23.1, n_d
    # Only the extra toRGB / fromRGB 1x1 convs sit outside the final path.
    assert count(g.parameters()) - n_g == sum(3 * c + 3 for c in [512] * 4 + [256, 128, 64, 32])


@pytest.mark.parametrize("level", range(4))
def test_shapes_at_every_level(level):
    g, d = Generator(TINY), Discriminator(TINY)
    z = torch.randn(6, 16)
    img = g(z, level, 0.5)
    res = 4 * 2**level
    assert img.shape == (6, 3, res, res)
    assert d(img, level, 0.5).shape == (6,)


def test_discriminator_refuses_wrong_resolution_with_clear_message():
    with pytest.raises(ValueError, match="expects 16x16"):
        Discriminator(TINY)(torch.randn(2, 3, 8, 8), 2)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_generator_alpha0_is_previous_output_upsampled_alpha1_is_new_path(level):
    torch.manual_seed(level)
    g = Generator(TINY)
    z = torch.randn(5, 16)
    previous = g(z, level - 1, 1.0)
    torch.testing.assert_close(g(z, level, 0.0), upsample(previous), rtol=0, atol=0)
    new_only = g(z, level, 1.0)  # float 1.0: the fade path is not computed at all
    torch.testing.assert_close(g(z, level, torch.tensor(1.0)), new_only)
    mid = g(z, level, 0.25)
    torch.testing.assert_close(mid, 0.75 * upsample(previous) + 0.25 * new_only)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_discriminator_alpha0_sees_the_downsampled_image(level):
    torch.manual_seed(level)
    d = Discriminator(TINY)
    res = 4 * 2**level
    img = torch.randn(4, 3, res, res)
    torch.testing.assert_close(d(img, level, 0.0), d(downsample(img), level - 1, 1.0))
    torch.testing.assert_close(d(img, level, torch.tensor(1.0)), d(img, level, 1.0))


def test_fade_in_real_blends_with_down_up_sampled_version():
    x = torch.randn(2, 3, 8, 8)
    blurred = upsample(downsample(x))
    torch.testing.assert_close(fade_in_real(x, 0.0), blurred)
    torch.testing.assert_close(fade_in_real(x, 1.0), x)
    torch.testing.assert_close(fade_in_real(x, 0.3), 0.7 * blurred + 0.3 * x)


def test_growing_keeps_layers_and_trains_only_the_phase_path():
    g = Generator(TINY)
    before = {name: id(p) for name, p in g.named_parameters()}
    g.set_trainable(2, fading=True)
    trainable = {n for n, p in g.named_parameters() if p.requires_grad}
    assert "to_rgb.1.weight" in trainable and "to_rgb.2.weight" in trainable
    assert "blocks.2.conv0.weight" not in trainable and "to_rgb.3.weight" not in trainable
    g.set_trainable(2, fading=False)
    assert not g.to_rgb[1].weight.requires_grad
    assert {name: id(p) for name, p in g.named_parameters()} == before


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_resampling_convs_equal_resample_then_conv(channels_last):
    torch.manual_seed(0)
    conv = EqualizedConv2d(6, 5, 3)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 6, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(upsample_conv(conv, x), conv(upsample(x)), rtol=0, atol=1e-5)
    torch.testing.assert_close(conv_downsample(conv, x), downsample(conv(x)), rtol=0, atol=1e-5)


def test_fused_scale_generator_equals_the_unfused_one_and_d_follows_the_official_order():
    torch.manual_seed(0)
    g, d = Generator(TINY), Discriminator(TINY)
    fused_cfg = TINY.model_copy(update={"fused_scale": True})
    g_fused, d_fused = Generator(fused_cfg), Discriminator(fused_cfg)
    g_fused.load_state_dict(g.state_dict())  # the same parameters, keys and shapes
    d_fused.load_state_dict(d.state_dict())
    z = torch.randn(4, 16)
    for level in range(4):
        for alpha in (0.3, 1.0):
            torch.testing.assert_close(
                g_fused(z, level, alpha), g(z, level, alpha), atol=1e-5, rtol=0
            )
    # D: conv + pool fused, then leaky ReLU (official fused_scale), i.e. this composition
    block, x = d.blocks[1], torch.randn(4, 16, 16, 16)
    expected = lrelu(downsample(block.conv1(lrelu(block.conv0(x)))))
    torch.testing.assert_close(d_fused.blocks[1](x), expected, atol=1e-5, rtol=0)
