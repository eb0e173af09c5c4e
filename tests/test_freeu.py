"""Unit tests of `freeu.py`: the reference's FreeU variant on the backbone tensor entering each up block."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny_models import TINY_SD

from cross_image_attention.freeu import (
    apply_backbone_freeu,
    fourier_lowpass_scale,
    freeu_factors_per_up_block,
    reference_freeu,
    up_block_input_channels,
)

SD15_FACTORS = {0: (1.2, 0.9), 1: (1.2, 0.9), 2: (1.2, 0.9), 3: (1.4, 0.2)}


def _numpy_lowpass(x: np.ndarray, scale: float) -> np.ndarray:
    """The reference filter, written directly with numpy."""
    height, width = x.shape[-2:]
    spectrum = np.fft.fftshift(np.fft.fft2(x.astype(np.float64), axes=(-2, -1)), axes=(-2, -1))
    spectrum[..., height // 2 - 1 : height // 2 + 1, width // 2 - 1 : width // 2 + 1] *= scale
    return np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1)), axes=(-2, -1)).real


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY_SD / "unet")).eval()


# ---------------------------------------------------------------------------------------------------------------
# The Fourier filter
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(8, 8), (6, 10), (5, 7), (2, 2)])
@pytest.mark.parametrize("scale", [0.9, 0.2, 0.0, 1.7])
def test_fourier_lowpass_matches_numpy(height, width, scale):
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    out = fourier_lowpass_scale(x, scale)
    assert out.shape == x.shape and out.dtype == torch.float32
    expected = torch.from_numpy(_numpy_lowpass(x.numpy(), scale)).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fourier_lowpass_scale_one_is_identity():
    x = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fourier_lowpass_scale(x, 1.0), x, atol=1e-6, rtol=1e-6)


def test_fourier_lowpass_scales_the_mean_of_a_constant_map():
    # A constant map has only the DC component (which lies in the central 2x2 after fftshift).
    x = torch.full((1, 1, 8, 8), 3.0)
    torch.testing.assert_close(fourier_lowpass_scale(x, 0.2), torch.full_like(x, 0.6))


def test_fourier_lowpass_touches_only_the_central_frequencies():
    # A high-frequency checkerboard (Nyquist) is outside the central block: unchanged whatever the scale.
    row = torch.tensor([1.0, -1.0] * 4)
    x = (row[None, :] * row[:, None]).view(1, 1, 8, 8)
    torch.testing.assert_close(fourier_lowpass_scale(x, 0.0), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fourier_lowpass_keeps_half_precision_dtype(dtype):
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = fourier_lowpass_scale(x, 0.9)
    assert out.dtype == dtype
    expected = torch.from_numpy(_numpy_lowpass(x.float().numpy(), 0.9)).float()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_apply_backbone_freeu_scales_first_half_then_filters():
    x = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(2))
    out = apply_backbone_freeu(x, 1.4, 0.2)
    scaled = x.numpy().copy()
    scaled[:, :3] *= 1.4
    expected = torch.from_numpy(_numpy_lowpass(scaled, 0.2)).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Input not modified in place.
    assert not torch.equal(out, x)


def test_apply_backbone_freeu_identity_factors():
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(apply_backbone_freeu(x, 1.0, 1.0), x, atol=1e-6, rtol=1e-6)


def test_apply_backbone_freeu_keeps_dtype():
    x = torch.randn(1, 4, 8, 8).to(torch.bfloat16)
    assert apply_backbone_freeu(x, 1.2, 0.9).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# Which up blocks, with which factors
# ---------------------------------------------------------------------------------------------------------------


def _fake_unet(block_out_channels, num_up_blocks=None):
    num_up_blocks = len(block_out_channels) if num_up_blocks is None else num_up_blocks
    return SimpleNamespace(
        config=SimpleNamespace(block_out_channels=tuple(block_out_channels)), up_blocks=[None] * num_up_blocks
    )


def test_sd15_up_block_inputs_and_factors():
    unet = _fake_unet((320, 640, 1280, 1280))
    assert up_block_input_channels(unet) == [1280, 1280, 1280, 640]
    assert freeu_factors_per_up_block(unet) == SD15_FACTORS


def test_tiny_unet_up_block_inputs_and_factors(tiny_unet):
    assert tuple(tiny_unet.config.block_out_channels) == (32, 64, 128, 128)
    assert up_block_input_channels(tiny_unet) == [128, 128, 128, 64]
    assert freeu_factors_per_up_block(tiny_unet) == SD15_FACTORS


def test_factor_rule_skips_other_channel_counts():
    # Inputs 1024, 512, 256: only the largest and its half are touched.
    unet = _fake_unet((256, 512, 1024))
    assert up_block_input_channels(unet) == [1024, 1024, 512]
    assert freeu_factors_per_up_block(unet) == {0: (1.2, 0.9), 1: (1.2, 0.9), 2: (1.4, 0.2)}
    unet = _fake_unet((64, 128, 256, 512))
    assert up_block_input_channels(unet) == [512, 512, 256, 128]
    assert freeu_factors_per_up_block(unet) == {0: (1.2, 0.9), 1: (1.2, 0.9), 2: (1.4, 0.2)}


# ---------------------------------------------------------------------------------------------------------------
# The context manager
# ---------------------------------------------------------------------------------------------------------------


def _unet_inputs():
    generator = torch.Generator().manual_seed(5)
    return torch.randn(1, 4, 16, 16, generator=generator), 500, torch.randn(1, 5, 32, generator=generator)


def test_reference_freeu_transforms_each_up_block_input_and_cleans_up(tiny_unet):
    sample, timestep, text = _unet_inputs()
    with torch.no_grad():
        before = tiny_unet(sample, timestep, text).sample

    raw, transformed = {}, {}

    def recorder(store, index):
        def hook(module, args, kwargs):
            store[index] = kwargs["hidden_states"].clone()
            store[index, "skip"] = [t.clone() for t in kwargs["res_hidden_states_tuple"]]

        return hook

    # Hooks run in registration order: one registered before the context sees the raw input, one registered inside
    # it (after FreeU's) sees what the block actually receives.
    handles = [
        block.register_forward_pre_hook(recorder(raw, i), with_kwargs=True)
        for i, block in enumerate(tiny_unet.up_blocks)
    ]
    try:
        with reference_freeu(tiny_unet):
            assert all(len(block._forward_pre_hooks) == 2 for block in tiny_unet.up_blocks)
            handles += [
                block.register_forward_pre_hook(recorder(transformed, i), with_kwargs=True)
                for i, block in enumerate(tiny_unet.up_blocks)
            ]
            with torch.no_grad():
                during = tiny_unet(sample, timestep, text).sample
    finally:
        for handle in handles:
            handle.remove()

    # The channel counts `up_block_input_channels` derives from the config are those of the real tensors.
    assert [raw[i].shape[1] for i in range(4)] == up_block_input_channels(tiny_unet)
    for index, (backbone, frequency) in SD15_FACTORS.items():
        torch.testing.assert_close(transformed[index], apply_backbone_freeu(raw[index], backbone, frequency))
        assert not torch.allclose(transformed[index], raw[index])
        # Skip connections are never touched.
        assert all(torch.equal(a, b) for a, b in zip(transformed[index, "skip"], raw[index, "skip"]))
    assert not torch.allclose(during, before)

    # Hooks removed: the output is the plain one again.
    assert all(len(block._forward_pre_hooks) == 0 for block in tiny_unet.up_blocks)
    with torch.no_grad():
        after = tiny_unet(sample, timestep, text).sample
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_reference_freeu_removes_hooks_when_the_body_raises(tiny_unet):
    with pytest.raises(RuntimeError, match="boom"):
        with reference_freeu(tiny_unet):
            assert sum(len(block._forward_pre_hooks) for block in tiny_unet.up_blocks) == 4
            raise RuntimeError("boom")
    assert all(len(block._forward_pre_hooks) == 0 for block in tiny_unet.up_blocks)


class _Recorder(torch.nn.Module):
    def forward(self, hidden_states, other=None):
        self.received = hidden_states
        return hidden_states


def test_reference_freeu_custom_factors_and_positional_calls():
    blocks = torch.nn.ModuleList([_Recorder(), _Recorder()])
    unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=(4, 8)), up_blocks=blocks)
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    with reference_freeu(unet, {1: (1.5, 0.3)}):
        blocks[0](x)  # not in `factors`: untouched
        blocks[1](x, "extra")  # positional call
        assert torch.equal(blocks[0].received, x)
        torch.testing.assert_close(blocks[1].received, apply_backbone_freeu(x, 1.5, 0.3))
        blocks[1](hidden_states=x)  # keyword call
        torch.testing.assert_close(blocks[1].received, apply_backbone_freeu(x, 1.5, 0.3))
    blocks[1](x)
    assert torch.equal(blocks[1].received, x)
