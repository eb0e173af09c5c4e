"""Tiny Stable Diffusion components for offline tests, built from configs with seeded weights.

`tests/data/tiny_sd` holds the configs and tokenizer of the parity fixture's tiny model; seeding with 0 and building
the UNet, the VAE and the text encoder in that order reproduces the fixture's weights exactly, so no weights are
stored in the repository.
"""

from pathlib import Path

import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from cross_image_attention import CrossImageAttentionPipeline

DATA = Path(__file__).parent / "data"
TINY_SD = DATA / "tiny_sd"
PARITY = DATA / "parity"

# Small calls keep every test but parity fast: 64 px images give 8x8 latents; the ranges make every feature
# (mixing at both levels, structure keys/values at counter 5, guidance, AdaIN) happen within 7 denoising steps.
SMALL_CALL = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 10,
    "skip_steps": 3,
    "cross_attn_32_range": (1, 7),
    "cross_attn_64_range": (1, 9),
    "adain_range": (2, 10),
    "domain_name": "animal",
    "use_masked_adain": False,
}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build_tiny_components() -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY_SD / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(TINY_SD / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(TINY_SD / "text_encoder"))
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(TINY_SD / "tokenizer"),
        "scheduler": DDIMScheduler.from_config(DDIMScheduler.load_config(TINY_SD / "scheduler")),
    }


def build_tiny_pipeline() -> CrossImageAttentionPipeline:
    pipe = CrossImageAttentionPipeline(
        **build_tiny_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_input(name: str) -> PIL.Image.Image:
    """One of the fixture's input photos (scikit-image sample images), as RGB."""
    return PIL.Image.open(PARITY / f"{name}.png").convert("RGB")
