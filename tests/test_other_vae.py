"""Every pipeline of the project with another diffusers VAE class (`AutoencoderTiny`, whose encoder returns latents,
not a distribution), as diffusers' image-to-image pipelines accept it."""

import PIL.Image
import pytest
import torch
from diffusers import AutoencoderTiny, EulerDiscreteScheduler
from tiny_models import build_tiny_components, seeded

from cross_image_attention import FreePromptEditingPipeline, StylePromptingPipeline


@pytest.fixture(scope="module")
def tiny_vae_components() -> dict:
    components = build_tiny_components()
    torch.manual_seed(0)
    components["vae"] = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).eval()
    return {**components, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def test_prompt_editing_with_autoencoder_tiny(tiny_vae_components, cat_image):
    pipe = FreePromptEditingPipeline(**tiny_vae_components)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a tiger", cat_image, num_inference_steps=2, height=64, width=64, return_source=True)
    assert out.images[0].size == (64, 64) and isinstance(out.source_images[0], PIL.Image.Image)
    assert out.inversion.latents.shape == (1, 3, 4, 8, 8)
    assert torch.isfinite(out.inversion.latents).all()


@pytest.mark.parametrize("real_reference", [False, True], ids=["generated reference", "real reference"])
def test_style_prompting_with_autoencoder_tiny(tiny_vae_components, cat_image, real_reference):
    scheduler = EulerDiscreteScheduler.from_config(tiny_vae_components["scheduler"].config)
    pipe = StylePromptingPipeline(**{**tiny_vae_components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a dog",
        "a cat",
        reference_image=cat_image if real_reference else None,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=[seeded(0), seeded(1)],
        reference_generator=seeded(2),
        output_type="pt",
    )
    assert out.images.shape == (2, 3, 64, 64) and out.reference_images.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.images).all()
