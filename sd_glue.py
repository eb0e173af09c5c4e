"""Stable Diffusion 1.x/2.x glue shared by this project's pipelines: text and image encoding, noise prediction,
decoding and the safety checker.

A mixin, not a `DiffusionPipeline` base class: diffusers' loader accepts exactly one pipeline class per loaded file,
so each entry file defines its pipeline as ``class X(SDGlueMixin, DiffusionPipeline)``. The mixin expects the
components of `StableDiffusionPipeline` (`vae`, `text_encoder`, `tokenizer`, `unet`, `scheduler`,
`safety_checker`, `feature_extractor`) and an `image_processor`.
"""

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils import logging

logger = logging.get_logger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")


def vae_scale_factor_of(vae) -> int:
    """Pixels per latent pixel, for any diffusers VAE class (as `StableDiffusionPipeline` computes it).

    Args:
        vae: The VAE, or its config as a dict (read from `vae/config.json` before loading any weights).
    """
    if vae is None:
        return 8
    config = vae.config if hasattr(vae, "config") else vae
    channels = config.get("block_out_channels") or config["decoder_block_out_channels"]
    return 2 ** (len(channels) - 1)


def size_multiple_of(vae_scale_factor: int, unet_config) -> int:
    """Image sides must be multiples of this: the VAE factor times the UNet's downsampling.

    Args:
        vae_scale_factor: Pixels per latent pixel ([`vae_scale_factor_of`]).
        unet_config: The UNet's config (a dict, also as read from `unet/config.json`).
    """
    return vae_scale_factor * 2 ** (len(unet_config["down_block_types"]) - 1)


class SDGlueMixin:
    """Text and image encoding, noise prediction, decoding and the safety checker for SD 1.x/2.x pipelines."""

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        return size_multiple_of(self.vae_scale_factor, self.unet.config)

    def check_prediction_type(self) -> None:
        """The UNet's output must be convertible to epsilon (checked before any model call)."""
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"The scheduler's prediction_type {prediction_type!r} is not supported; this pipeline needs one of "
                f"{PREDICTION_TYPES}."
            )

    def encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP last hidden states `[B, 77, D]`, padded to the tokenizer's maximum length, no attention mask (SD)."""
        input_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(input_ids.to(device))[0]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior **mode** (the mean; not a sample) times the scaling factor, in float32, image by image.

        Works with every diffusers VAE class (`AutoencoderKL`'s distribution, `AutoencoderTiny`'s latents).
        """
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        latents = torch.cat([retrieve_latents(self.vae.encode(p[None]), sample_mode="argmax") for p in pixels])
        return latents.float() * self.vae.config.scaling_factor

    def predict_noise(self, latents: torch.Tensor, timestep, embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction in float32 (v-prediction models are converted to epsilon)."""
        output = self.unet(
            latents.to(self.unet.dtype), timestep, encoder_hidden_states=embeddings.to(self.unet.dtype)
        ).sample.float()
        if self.scheduler.config.prediction_type == "v_prediction":
            alpha_prod_t = self.scheduler.alphas_cumprod[int(timestep)]
            output = alpha_prod_t**0.5 * output + (1 - alpha_prod_t) ** 0.5 * latents
        return output

    def decode_latents(self, latents: torch.Tensor, output_type: str, device, dtype):
        """Decode to images of ``output_type`` (``"latent"`` returns the latents), blacking out what the safety
        checker flags."""
        if output_type == "latent":
            return latents
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        images = self.run_safety_checker(images, device, dtype)
        return self.image_processor.postprocess(images, output_type=output_type)

    def run_safety_checker(self, image: torch.Tensor, device, dtype) -> torch.Tensor:
        """Black out images the safety checker flags (as `StableDiffusionPipeline` does); no-op without one."""
        if self.safety_checker is None:
            return image
        features = self.image_processor.postprocess(image, output_type="pil")
        checker_input = self.feature_extractor(features, return_tensors="pt").to(device)
        image, has_nsfw = self.safety_checker(images=image, clip_input=checker_input.pixel_values.to(dtype))
        if any(has_nsfw):
            logger.warning("The safety checker flagged some outputs; they were replaced by black images.")
        return image
