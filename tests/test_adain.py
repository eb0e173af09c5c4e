"""Unit tests of `adain.py`: plain and masked AdaIN on single latents, checked against hand-computed statistics."""

import math

import pytest
import torch

from cross_image_attention.adain import ADAIN_EPS, adain, channel_mean_std, mask_supports_adain, masked_adain


def _stats(values):
    """Mean and sqrt(unbiased variance + 1e-5) of a list of floats, in plain Python."""
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance + 1e-5)


def test_eps_is_the_reference_value():
    assert ADAIN_EPS == 1e-5


def test_channel_mean_std_hand_computed():
    # Channel 0: 1, 2, 3, 4 -> mean 2.5, unbiased variance 5/3. Channel 1: 0, 0, 0, 8 -> mean 2, variance 16.
    features = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]])
    mean, std = channel_mean_std(features)
    assert mean.shape == (2, 1, 1) and std.shape == (2, 1, 1)
    torch.testing.assert_close(mean.flatten(), torch.tensor([2.5, 2.0]))
    torch.testing.assert_close(std.flatten(), torch.tensor([math.sqrt(5 / 3 + 1e-5), math.sqrt(16 + 1e-5)]))


def test_channel_mean_std_eps_is_added_to_the_variance_before_the_square_root():
    # A constant channel has variance 0: std must be sqrt(eps) (not eps, not 0).
    features = torch.full((1, 3, 3), 7.0)
    mean, std = channel_mean_std(features)
    assert mean.item() == pytest.approx(7.0)
    assert std.item() == pytest.approx(math.sqrt(1e-5), rel=1e-5)


def test_channel_mean_std_with_mask_uses_only_mask_pixels():
    features = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[10.0, -1.0, 0.5], [2.0, 3.0, 100.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mean, std = channel_mean_std(features, mask)
    expected = [_stats([1.0, 3.0, 5.0]), _stats([10.0, 0.5, 3.0])]
    torch.testing.assert_close(mean.flatten(), torch.tensor([e[0] for e in expected]))
    torch.testing.assert_close(std.flatten(), torch.tensor([e[1] for e in expected]))


def test_channel_mean_std_accepts_bool_mask():
    features = torch.arange(8.0).reshape(2, 2, 2)
    float_mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    mean_f, std_f = channel_mean_std(features, float_mask)
    mean_b, std_b = channel_mean_std(features, float_mask.bool())
    torch.testing.assert_close(mean_b, mean_f)
    torch.testing.assert_close(std_b, std_f)


def test_adain_hand_computed():
    content = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    style = torch.tensor([[[10.0, 10.0], [20.0, 20.0]]])
    c_mean, c_std = _stats([1.0, 2.0, 3.0, 4.0])
    s_mean, s_std = _stats([10.0, 10.0, 20.0, 20.0])
    expected = torch.tensor([[[(v - c_mean) / c_std * s_std + s_mean for v in row] for row in [[1, 2], [3, 4]]]])
    torch.testing.assert_close(adain(content, style), expected)


def test_adain_output_has_style_statistics_per_channel():
    generator = torch.Generator().manual_seed(0)
    content = torch.randn(4, 8, 8, generator=generator) * 3 + 1
    style = torch.randn(4, 8, 8, generator=generator) * torch.tensor([0.5, 2.0, 1.0, 4.0]).view(4, 1, 1) - 2
    out = adain(content, style)
    assert out.shape == content.shape
    out_mean, _ = channel_mean_std(out)
    style_mean, _ = channel_mean_std(style)
    torch.testing.assert_close(out_mean, style_mean, atol=1e-5, rtol=1e-5)
    # Unbiased variance of the output: var_c / (var_c + eps) * (var_s + eps), exactly.
    var_c, var_s, var_o = content.reshape(4, -1).var(1), style.reshape(4, -1).var(1), out.reshape(4, -1).var(1)
    torch.testing.assert_close(var_o, var_c / (var_c + 1e-5) * (var_s + 1e-5), rtol=1e-5, atol=1e-6)


def test_masked_adain_keeps_pixels_outside_the_content_mask():
    generator = torch.Generator().manual_seed(1)
    content = torch.randn(4, 6, 6, generator=generator)
    style = torch.randn(4, 6, 6, generator=generator) * 3 + 5
    content_mask = torch.zeros(6, 6)
    content_mask[1:4, 2:5] = 1
    style_mask = torch.zeros(6, 6)
    style_mask[3:6, 0:4] = 1
    out = masked_adain(content, style, content_mask, style_mask)
    outside = content_mask == 0
    assert torch.equal(out[:, outside], content[:, outside])
    assert not torch.allclose(out[:, ~outside], content[:, ~outside])


def test_masked_adain_inside_statistics_match_the_styles_masked_statistics():
    generator = torch.Generator().manual_seed(2)
    content = torch.randn(4, 6, 6, generator=generator) * 2
    style = torch.randn(4, 6, 6, generator=generator) * 3 + 5
    content_mask = torch.zeros(6, 6)
    content_mask[1:4, 2:5] = 1
    style_mask = torch.zeros(6, 6)
    style_mask[3:6, 0:4] = 1
    # Style pixels outside its mask must not matter.
    style_elsewhere = style.clone()
    style_elsewhere[:, style_mask == 0] = 1000.0
    out = masked_adain(content, style, content_mask, style_mask)
    torch.testing.assert_close(masked_adain(content, style_elsewhere, content_mask, style_mask), out)

    inside_out = out[:, content_mask == 1]
    inside_content = content[:, content_mask == 1]
    inside_style = style[:, style_mask == 1]
    torch.testing.assert_close(inside_out.mean(1), inside_style.mean(1), atol=1e-5, rtol=1e-5)
    var_c, var_s = inside_content.var(1), inside_style.var(1)
    torch.testing.assert_close(inside_out.var(1), var_c / (var_c + 1e-5) * (var_s + 1e-5), rtol=1e-5, atol=1e-6)

    # And the exact formula, pixel by pixel, from hand statistics.
    for channel in range(4):
        c_mean, c_std = _stats(inside_content[channel].tolist())
        s_mean, s_std = _stats(inside_style[channel].tolist())
        expected = (inside_content[channel] - c_mean) / c_std * s_std + s_mean
        torch.testing.assert_close(inside_out[channel], expected, atol=1e-5, rtol=1e-5)


def test_masked_adain_with_full_masks_equals_plain_adain():
    generator = torch.Generator().manual_seed(3)
    content = torch.randn(4, 5, 5, generator=generator)
    style = torch.randn(4, 5, 5, generator=generator) + 2
    ones = torch.ones(5, 5)
    torch.testing.assert_close(masked_adain(content, style, ones, ones), adain(content, style))


def test_masked_adain_accepts_bool_masks():
    generator = torch.Generator().manual_seed(4)
    content = torch.randn(4, 5, 5, generator=generator)
    style = torch.randn(4, 5, 5, generator=generator) + 2
    content_mask = torch.rand(5, 5, generator=generator) > 0.4
    style_mask = torch.rand(5, 5, generator=generator) > 0.4
    expected = masked_adain(content, style, content_mask.float(), style_mask.float())
    torch.testing.assert_close(masked_adain(content, style, content_mask, style_mask), expected)


@pytest.mark.parametrize(
    ("pixels", "expected"),
    [(0, False), (1, False), (2, True), (3, True), (16, True)],
)
def test_mask_supports_adain_needs_two_pixels(pixels, expected):
    mask = torch.zeros(4, 4)
    mask.view(-1)[:pixels] = 1
    assert mask_supports_adain(mask) is expected
    assert mask_supports_adain(mask.bool()) is expected


@pytest.mark.filterwarnings("ignore:var\\(\\). degrees of freedom")
def test_single_pixel_mask_would_give_nan_statistics():
    # Documents why `mask_supports_adain` exists: one pixel -> NaN unbiased variance.
    mask = torch.zeros(3, 3)
    mask[1, 1] = 1
    _, std = channel_mean_std(torch.randn(2, 3, 3), mask)
    assert torch.isnan(std).all()
