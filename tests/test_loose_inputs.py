"""Loosely typed or degenerate inputs get a ValueError/TypeError naming the argument (issue 10), and images decode
alike for the command line and Python users."""

import io
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.utils import load_image as diffusers_load_image
from safetensors.torch import save_file
from tiny_models import SMALL_CALL

from cross_image_attention import InversionResult, load_image
from cross_image_attention.inputs import MAX_SCALE, centre_crop_box, image_to_pixels, mask_to_latent_grid
from cross_image_attention.inversion import FORMAT_NAME, FORMAT_VERSION
from cross_image_attention.segmentation import pair_segmentation_masks

CAT = PIL.Image.new("RGB", (64, 64), (200, 120, 40))

LOOSE_CALLS = [
    ({"swap_guidance_scale": 1e300}, ValueError, r"swap_guidance_scale.*\[0, 100\]"),
    ({"contrast_strength": MAX_SCALE + 1}, ValueError, "contrast_strength"),
    ({"inversion_guidance_scale": 1e30}, ValueError, "inversion_guidance_scale"),
    ({"use_masked_adain": "false"}, TypeError, "use_masked_adain"),
    ({"reference_freeu": 1}, TypeError, "reference_freeu"),
    ({"return_reconstructions": "no"}, TypeError, "return_reconstructions"),
    ({"return_dict": "no"}, TypeError, "return_dict"),
    ({"adain_range": range(2, 10, 2)}, ValueError, "adain_range.*step"),
]


@pytest.mark.parametrize("overrides, error, pattern", LOOSE_CALLS, ids=[str(i) for i in range(len(LOOSE_CALLS))])
def test_loose_call_arguments(tiny_pipe, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        tiny_pipe(appearance_image=CAT, structure_image=CAT, **{**SMALL_CALL, **overrides})


def test_loose_invert_arguments(tiny_pipe):
    with pytest.raises(TypeError, match="`image`"):
        tiny_pipe.invert(None, height=64, width=64)
    with pytest.raises(ValueError, match="guidance_scale"):
        tiny_pipe.invert(CAT, guidance_scale=1e30, height=64, width=64)
    with pytest.raises(TypeError, match="reference_freeu"):
        tiny_pipe.invert(CAT, reference_freeu="no", height=64, width=64)


def test_range_of_step_one_is_a_pair(tiny_pipe):
    from cross_image_attention.inputs import check_range

    assert check_range(range(2, 10), "adain_range") == (2, 10)


def test_one_pixel_mask_and_image_at_another_aspect():
    assert centre_crop_box(1, 1, 64, 128) == (0, 0, 1, 1)
    mask = mask_to_latent_grid(np.ones((1, 1)), "appearance_mask", 128, 64, 8)
    assert mask.shape == (16, 8) and bool(mask.all())
    pixels = image_to_pixels(PIL.Image.new("RGB", (1, 1), (255, 255, 255)), "image", 128, 64, _processor())
    assert pixels.shape == (1, 3, 128, 64) and bool((pixels > 0.9).all())  # white, not a black crop


def _processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=8, resample="bicubic")


def test_cat_of_nothing():
    with pytest.raises(ValueError, match="results"):
        InversionResult.cat([])


def _inversion(**overrides) -> dict:
    tensors = {"latents": torch.zeros(1, 4, 8, 8), "noise": torch.zeros(1, 2, 4, 8, 8), "timesteps": torch.arange(2)}
    tensors.update(overrides)
    return tensors


def _write(path, tensors, **metadata):
    save_file(tensors, str(path), metadata={"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata})
    return path


def test_loaded_inversions_must_be_finite(tmp_path):
    assert InversionResult.load(_write(tmp_path / "ok.safetensors", _inversion())).batch_size == 1
    bad = _write(tmp_path / "nan.safetensors", _inversion(noise=torch.full((1, 2, 4, 8, 8), math.nan)))
    with pytest.raises(ValueError, match="non-finite noise"):
        InversionResult.load(bad)


def test_nested_or_mistyped_metadata_is_refused(tmp_path):
    nested = _write(tmp_path / "nested.safetensors", _inversion(), prompt="[" * 5000 + "]" * 5000)
    with pytest.raises(ValueError, match="'prompt'"):
        InversionResult.load(nested)
    mistyped = _write(tmp_path / "typed.safetensors", _inversion(), height=json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="'height' must be a int"):
        InversionResult.load(mistyped)


def test_nan_attention_never_reaches_kmeans():
    captured = {"self": torch.full((2, 64, 64), math.nan), "cross": torch.rand(2, 16, 77)}
    with pytest.raises(ValueError, match="use_masked_adain.*non-finite"):
        pair_segmentation_masks(captured, [[[5]]], (8, 8), 1)


def _png(image: PIL.Image.Image, **params) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    buffer.seek(0)
    return buffer


def test_sixteen_bit_png_is_scaled_not_clipped():
    samples = np.full((4, 4), 32768, dtype=np.uint16)
    image = load_image(_png(PIL.Image.fromarray(samples)))
    assert image.mode == "RGB" and np.asarray(image).max() == 128  # 32768 / 65535 of 255, not white


def test_exif_orientation_and_grayscale_as_in_diffusers(tmp_path):
    wide = PIL.Image.fromarray(np.arange(8 * 4 * 3, dtype=np.uint8).reshape(4, 8, 3))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rotated.png"
    wide.save(path, exif=exif)
    ours, theirs = load_image(path), diffusers_load_image(str(path))
    assert ours.size == (4, 8) and np.array_equal(np.asarray(ours), np.asarray(theirs))
    gray = load_image(_png(PIL.Image.new("L", (4, 4), 90)))
    assert gray.mode == "RGB" and np.asarray(gray).tolist() == np.full((4, 4, 3), 90).tolist()


def test_decompression_bombs_are_refused(monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(ValueError, match="too large"):
        load_image(_png(PIL.Image.new("RGB", (16, 16))))
