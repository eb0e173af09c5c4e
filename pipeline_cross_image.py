"""Cross-Image Attention for Zero-Shot Appearance Transfer (Alaluf, Garibi et al., arXiv 2311.03335) for diffusers.

Given a structure image and an appearance image of semantically similar objects, Stable Diffusion renders the
structure image's object with the appearance image's look, with no training:

1. both images are inverted with edit-friendly DDPM inversion;
2. a batch ``[OUT, APP, STRUCT]`` is denoised with their noise maps; in the decoder's two highest-resolution
   self-attention levels, the output's queries attend to the appearance image's keys and values (cross-image
   attention) with contrasted attention maps, guided by the difference to a plain pass;
3. after each step, AdaIN (masked by self-segmentation) pulls the output's latent statistics towards the appearance.

With default arguments the pipeline reproduces the authors' implementation; its quirks are kept and commented where
they are reproduced (the step schedule's in `cross_image_plan.py`).
"""

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import BaseOutput, logging
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from .adain import adain_per_pair, usable_pair_masks
from .attention_control import AttentionController, RowGroups
from .attention_processors import controlled_attention
from .cross_image_plan import (
    CrossImageLayers,
    cross_image_edits,
    plan_denoising_steps,
    row_groups_per_step,
    segmentation_captures,
    select_cross_image_layers,
)
from .freeu import reference_freeu as reference_freeu_hooks
from .inputs import (
    ImageInput,
    RangeInput,
    as_image_list,
    check_bool,
    check_callback,
    check_int,
    check_output_type,
    check_range,
    check_scale,
    check_size,
    generators_per_item,
    image_to_pixels,
    mask_to_latent_grid,
    per_item,
)
from .inversion import InversionResult, ddpm_coefficients, ddpm_step, invert_edit_friendly
from .sd_glue import SDGlueMixin, vae_scale_factor_of
from .segmentation import noun_token_positions, pair_segmentation_masks

logger = logging.get_logger(__name__)

# Without a domain name the reference's prompt is "A photo of a object" (its domain defaults to this word).
DEFAULT_DOMAIN = "object"

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline
        >>> from diffusers.utils import load_image

        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ...     custom_pipeline="<path or Hub id of this repository>",
        ...     trust_remote_code=True,
        ...     safety_checker=None,
        ... ).to("cuda")
        >>> out = pipe(
        ...     appearance_image=load_image("zebra.png"),
        ...     structure_image=load_image("giraffe.png"),
        ...     domain_name="animal",
        ...     generator=torch.Generator().manual_seed(42),
        ... )
        >>> out.images[0].save("transfer.png")
        ```
"""


@dataclass
class CrossImageAttentionPipelineOutput(BaseOutput):
    """Output of [`CrossImageAttentionPipeline`].

    Args:
        images: The appearance transfers, one per pair (PIL images, a numpy array, a tensor, or latents).
        appearance_reconstructions: The appearance branch decoded, when `return_reconstructions=True`.
        structure_reconstructions: The structure branch decoded, when `return_reconstructions=True`.
        appearance_inversion (`InversionResult`): The appearance images' inversions (given or computed).
        structure_inversion (`InversionResult`): The structure images' inversions (given or computed).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    appearance_reconstructions: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    structure_reconstructions: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    appearance_inversion: InversionResult | None = None
    structure_inversion: InversionResult | None = None


@dataclass
class TransferInputs:
    """A call's arguments after [`CrossImageAttentionPipeline.check_inputs`]: checked, one entry per pair."""

    num_pairs: int
    num_inference_steps: int
    skip_steps: int
    swap_guidance_scale: float
    contrast_strength: float
    inversion_guidance_scale: float
    cross_attn_32_range: RangeInput
    cross_attn_64_range: RangeInput
    adain_range: RangeInput
    appearance_images: list | None
    structure_images: list | None
    prompts: list[str]
    generators: list
    pair_masks: list | None
    noun_positions: list | None
    layers: CrossImageLayers
    callback_tensor_inputs: list[str]

    @property
    def segment(self) -> bool:
        """Masks come from self-segmentation (masked AdaIN without given masks, with AdaIN steps to run)."""
        return self.noun_positions is not None


def check_steps(num_inference_steps, skip_steps) -> tuple[int, int]:
    """`T >= 1` and `0 <= S < T`, as integers."""
    num_inference_steps = check_int(num_inference_steps, "num_inference_steps", 1)
    skip_steps = check_int(skip_steps, "skip_steps", 0)
    if skip_steps >= num_inference_steps:
        raise ValueError(f"`skip_steps` ({skip_steps}) must be smaller than `num_inference_steps`.")
    return num_inference_steps, skip_steps


def check_schedule_length(num_inference_steps: int, num_train_timesteps: int) -> None:
    """The DDIM schedule cannot be longer than the scheduler's training schedule (its `num_train_timesteps`)."""
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be at most {num_train_timesteps} (the scheduler's training steps), got "
            f"{num_inference_steps}."
        )


def needs_segmentation(use_masked_adain: bool, masks_given: bool, adain_range: RangeInput, num_steps: int) -> bool:
    """Whether a call segments the images: masked AdaIN without given masks, with AdaIN steps to run."""
    adain_start, adain_end = adain_range
    return use_masked_adain and not masks_given and adain_start < min(adain_end, num_steps)


def object_noun_positions(tokenizer, prompts: list[str], object_nouns: list) -> list:
    """Token positions of each pair's object noun in its prompt (self-segmentation scores clusters with them).

    Needs only the tokenizer, so the front ends run it before loading a model.

    Args:
        tokenizer: The pipeline's CLIP tokenizer.
        prompts: One prompt per pair.
        object_nouns: One noun per pair (None when neither `object_noun` nor `domain_name` was given).
    """
    if None in object_nouns:
        raise ValueError(
            "`use_masked_adain=True` needs `domain_name` (or `object_noun`) to find the object, or both "
            "`appearance_mask` and `structure_mask`; or pass `use_masked_adain=False`."
        )
    positions = [noun_token_positions(tokenizer, p, n) for p, n in zip(prompts, object_nouns)]
    for found, p, n in zip(positions, prompts, object_nouns):
        if not found:
            raise ValueError(f"`object_noun` {n!r} does not occur in the prompt {p!r}.")
    return positions


def check_transfer_settings(
    swap_guidance_scale,
    contrast_strength,
    inversion_guidance_scale,
    cross_attn_32_range,
    cross_attn_64_range,
    adain_range,
) -> dict:
    """The checks of [`CrossImageAttentionPipeline.__call__`] that need no model, shared with the front ends so that
    they reject bad values before loading one. Returns the values checked and normalised, by argument name."""
    settings = {
        name: check_scale(value, name)
        for name, value in (
            ("swap_guidance_scale", swap_guidance_scale),
            ("contrast_strength", contrast_strength),
            ("inversion_guidance_scale", inversion_guidance_scale),
        )
    }
    for name, value in (
        ("cross_attn_32_range", cross_attn_32_range),
        ("cross_attn_64_range", cross_attn_64_range),
        ("adain_range", adain_range),
    ):
        settings[name] = check_range(value, name)
    return settings


def call_defaults() -> dict:
    """The default of every keyword argument of [`CrossImageAttentionPipeline.__call__`] (the reference's values):
    the one source the command line, batch runs, the demo and the benchmark read theirs from."""
    parameters = inspect.signature(CrossImageAttentionPipeline.__call__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


class CrossImageAttentionPipeline(SDGlueMixin, DiffusionPipeline):
    r"""Zero-shot appearance transfer with cross-image attention on Stable Diffusion 1.x/2.x.

    This model inherits from [`DiffusionPipeline`]; see the superclass documentation for the generic methods
    (downloading, saving, running on a device, offloading).

    Args:
        vae ([`AutoencoderKL`]): Variational autoencoder (any diffusers VAE class) to and from latents.
        text_encoder ([`~transformers.CLIPTextModel`]): Frozen text encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]): Tokenizer of the text encoder.
        unet ([`UNet2DConditionModel`]): The denoising UNet (epsilon or v prediction).
        scheduler ([`SchedulerMixin`]): Any scheduler config of the model; it is converted to [`DDIMScheduler`],
            whose timesteps and ``alphas_cumprod`` the edit-friendly DDPM steps use.
        safety_checker ([`StableDiffusionSafetyChecker`]): Optional NSFW classifier; flagged outputs are blacked out.
        feature_extractor ([`~transformers.CLIPImageProcessor`]): Optional, needed by the safety checker.
        requires_safety_checker (`bool`): Recorded in the config as in [`StableDiffusionPipeline`].
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        requires_safety_checker: bool = True,
    ):
        super().__init__()
        if not isinstance(scheduler, DDIMScheduler):
            # SD 1.5 ships a PNDM config; the method needs DDIM's timesteps and final alpha.
            scheduler = DDIMScheduler.from_config(scheduler.config)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = vae_scale_factor_of(vae)
        # The reference resizes with Pillow's bicubic filter (its default for RGB), not diffusers' lanczos.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self._interrupt = False
        self._num_timesteps = 0

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the current (or last) call: `num_inference_steps - skip_steps`."""
        return self._num_timesteps

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------

    def check_schedule(self, num_inference_steps, skip_steps, height, width) -> tuple[int, int]:
        """Validate the settings shared by inversion and transfer, and the pipeline's model parts."""
        if not isinstance(self.scheduler, DDIMScheduler):
            raise ValueError(
                f"`scheduler` is a {type(self.scheduler).__name__}; edit-friendly DDPM inversion needs DDIM's "
                "timesteps: set `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`."
            )
        self.check_prediction_type()
        check_size(height, width, self.size_multiple)
        num_inference_steps, skip_steps = check_steps(num_inference_steps, skip_steps)
        check_schedule_length(num_inference_steps, self.scheduler.config.num_train_timesteps)
        return num_inference_steps, skip_steps

    @staticmethod
    def default_prompts(prompt, domain_name, count: int) -> list[str]:
        """The prompt per item: the given one, else the reference's ``"A photo of a {domain_name}"``."""
        prompts = per_item(prompt, "prompt", count)
        domains = per_item(domain_name, "domain_name", count)
        return [p if p is not None else f"A photo of a {d or DEFAULT_DOMAIN}" for p, d in zip(prompts, domains)]

    def check_inputs(
        self,
        appearance_image,
        structure_image,
        domain_name,
        prompt,
        object_noun,
        num_inference_steps,
        skip_steps,
        swap_guidance_scale,
        contrast_strength,
        cross_attn_32_range,
        cross_attn_64_range,
        adain_range,
        use_masked_adain,
        appearance_mask,
        structure_mask,
        appearance_inversion,
        structure_inversion,
        inversion_guidance_scale,
        reference_freeu,
        height,
        width,
        generator,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> TransferInputs:
        """Every check of [`__call__`], before any model runs; returns the arguments brought to one entry per pair.

        Also checks the UNet's structure (the layers cross-image attention and self-segmentation need) and given
        inversions against the call's settings.
        """
        num_inference_steps, skip_steps = self.check_schedule(num_inference_steps, skip_steps, height, width)
        settings = check_transfer_settings(
            swap_guidance_scale=swap_guidance_scale,
            contrast_strength=contrast_strength,
            inversion_guidance_scale=inversion_guidance_scale,
            cross_attn_32_range=cross_attn_32_range,
            cross_attn_64_range=cross_attn_64_range,
            adain_range=adain_range,
        )
        use_masked_adain = check_bool(use_masked_adain, "use_masked_adain")
        reference_freeu = check_bool(reference_freeu, "reference_freeu")
        check_output_type(output_type)
        tensor_inputs = check_callback(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )

        appearance_images = as_image_list(appearance_image, "appearance_image")
        structure_images = as_image_list(structure_image, "structure_image")
        num_pairs = self._count_pairs(
            ("appearance", appearance_images, appearance_inversion),
            ("structure", structure_images, structure_inversion),
        )
        prompts = self.default_prompts(prompt, domain_name, num_pairs)
        generators = generators_per_item(generator, num_pairs)
        pair_masks = self._given_masks(appearance_mask, structure_mask, use_masked_adain, num_pairs, height, width)
        num_steps = num_inference_steps - skip_steps
        segment = needs_segmentation(use_masked_adain, pair_masks is not None, settings["adain_range"], num_steps)
        layers = select_cross_image_layers(self.unet)
        noun_positions = None
        if segment:
            if layers.capture_cross is None:
                raise ValueError(
                    "Self-segmentation needs a cross-attention layer at the decoder's second level, which this UNet "
                    "lacks; pass `appearance_mask` and `structure_mask`, or `use_masked_adain=False`."
                )
            object_nouns = [
                noun if noun is not None else domain
                for noun, domain in zip(
                    per_item(object_noun, "object_noun", num_pairs), per_item(domain_name, "domain_name", num_pairs)
                )
            ]
            noun_positions = object_noun_positions(self.tokenizer, prompts, object_nouns)

        made_with = {
            "num_inference_steps": num_inference_steps,
            "skip_steps": skip_steps,
            "guidance_scale": settings["inversion_guidance_scale"],
            "height": height,
            "width": width,
            "reference_freeu": reference_freeu,
        }
        for name, inversion in (
            ("appearance_inversion", appearance_inversion),
            ("structure_inversion", structure_inversion),
        ):
            if inversion is not None:
                self._check_inversion(inversion, name, prompts, made_with)
        return TransferInputs(
            num_pairs=num_pairs,
            num_inference_steps=num_inference_steps,
            skip_steps=skip_steps,
            **settings,
            appearance_images=appearance_images,
            structure_images=structure_images,
            prompts=prompts,
            generators=generators,
            pair_masks=pair_masks,
            noun_positions=noun_positions,
            layers=layers,
            callback_tensor_inputs=tensor_inputs,
        )

    @staticmethod
    def _count_pairs(*branches) -> int:
        """Check that each branch has images or an inversion (not both); the number of pairs they form."""
        counts = set()
        for name, images, inversion in branches:
            if images is None and inversion is None:
                raise ValueError(f"Pass `{name}_image` or `{name}_inversion`.")
            if images is not None and inversion is not None:
                raise ValueError(f"Pass `{name}_image` or `{name}_inversion`, not both.")
            if inversion is not None and not isinstance(inversion, InversionResult):
                raise TypeError(f"`{name}_inversion` must be an InversionResult, got {type(inversion).__name__}.")
            counts.add(len(images) if images is not None else inversion.batch_size)
        if len(counts - {1}) > 1:
            raise ValueError(f"Appearance and structure batches must have equal lengths or length 1, got {counts}.")
        return max(counts)

    def _given_masks(self, appearance_mask, structure_mask, use_masked_adain, num_pairs, height, width):
        """The user's masks per pair on the latent grid (see [`usable_pair_masks`]), or None when none were given."""
        if (appearance_mask is None) != (structure_mask is None):
            raise ValueError("Pass both `appearance_mask` and `structure_mask`, or neither.")
        if appearance_mask is None:
            return None
        if not use_masked_adain:
            raise ValueError("Masks are only used by masked AdaIN; set `use_masked_adain=True` or drop the masks.")
        masks = {
            name: [
                mask_to_latent_grid(mask, name, height, width, self.vae_scale_factor)
                for mask in per_item(given, name, num_pairs, (object,))
            ]
            for name, given in (("appearance_mask", appearance_mask), ("structure_mask", structure_mask))
        }
        return usable_pair_masks(list(zip(masks["appearance_mask"], masks["structure_mask"])))

    def _check_inversion(self, inversion: InversionResult, name: str, prompts: list[str], settings: dict) -> None:
        """Refuse an inversion made with other settings than the call's (those it records, and its shapes)."""
        for key, value in settings.items():
            stored = getattr(inversion, key)
            if stored is not None and stored != value:
                raise ValueError(
                    f"`{name}` was made with {key}={stored} but this call uses {key}={value}; invert again with the "
                    "call's settings or pass the matching arguments."
                )
        # The reference inverts and denoises with the same prompt; a different one silently degrades the transfer.
        mismatched = [p for p in prompts if inversion.prompt is not None and p != inversion.prompt]
        if mismatched:
            raise ValueError(
                f"`{name}` was made with prompt={inversion.prompt!r} but this call uses prompt={mismatched[0]!r}; "
                "pass the same `prompt` / `domain_name` as for the inversion."
            )
        height, width = settings["height"], settings["width"]
        latent_shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if tuple(inversion.latents.shape[1:]) != latent_shape:
            raise ValueError(
                f"`{name}` has latents of shape {tuple(inversion.latents.shape[1:])}, but a {height}x{width} call "
                f"needs {latent_shape}."
            )
        self.scheduler.set_timesteps(settings["num_inference_steps"])
        if not torch.equal(inversion.timesteps.cpu().long(), self.scheduler.timesteps[settings["skip_steps"] :]):
            raise ValueError(
                f"`{name}` holds noise maps for other timesteps than num_inference_steps="
                f"{settings['num_inference_steps']}, skip_steps={settings['skip_steps']} give; invert again with the "
                "call's settings."
            )
        if not (torch.isfinite(inversion.latents).all() and torch.isfinite(inversion.noise).all()):
            raise ValueError(f"`{name}` holds non-finite values (NaN or infinity); invert the image again.")

    # ------------------------------------------------------------------------------------------------------------
    # Building blocks
    # ------------------------------------------------------------------------------------------------------------

    def _invert_images(
        self,
        images,
        names,
        prompts,
        generators,
        num_inference_steps,
        skip_steps,
        guidance_scale,
        height,
        width,
        use_reference_freeu,
    ) -> InversionResult:
        """Preprocess, encode and invert images (batched in each UNet call); ``names`` label errors per image."""
        device = self._execution_device
        pixels = torch.cat(
            [image_to_pixels(im, name, height, width, self.image_processor) for im, name in zip(images, names)]
        )
        clean_latents = self.encode_images(pixels)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        all_timesteps = self.scheduler.timesteps
        conditional = self.encode_text(prompts, device)
        unconditional = self.encode_text([""], device).expand_as(conditional)
        with reference_freeu_hooks(self.unet) if use_reference_freeu else nullcontext():
            latents, noise = invert_edit_friendly(
                self.predict_noise,
                self.scheduler,
                clean_latents,
                conditional,
                unconditional,
                all_timesteps,
                skip_steps,
                guidance_scale,
                generators,
                self.progress_bar,
            )
        return InversionResult(
            latents=latents,
            noise=noise,
            timesteps=all_timesteps[skip_steps:].cpu(),
            prompt=prompts[0] if len(set(prompts)) == 1 else None,
            num_inference_steps=num_inference_steps,
            skip_steps=skip_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            reference_freeu=use_reference_freeu,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def invert(
        self,
        image: ImageInput | list[ImageInput],
        prompt: str | list[str] | None = None,
        domain_name: str | list[str] | None = None,
        num_inference_steps: int = 100,
        skip_steps: int = 32,
        guidance_scale: float = 3.5,
        height: int = 512,
        width: int = 512,
        generator: torch.Generator | list[torch.Generator] | None = None,
        reference_freeu: bool = True,
    ) -> InversionResult:
        """Invert images with edit-friendly DDPM inversion.

        Args:
            image: A PIL image (RGB), a numpy array (`[H, W, 3]`, uint8 or float in [0, 1]), a tensor (`[3, H, W]` in
                [0, 1]), or a list of them. Images are centre-cropped to the target aspect and resized.
            prompt: The inversion prompt; defaults to ``"A photo of a {domain_name}"`` (domain ``"object"`` when
                omitted, as the reference).
            domain_name: The object class, e.g. ``"animal"``.
            num_inference_steps: Length `T` of the DDIM timestep schedule.
            skip_steps: `S`, the noisiest steps that are skipped; the result holds `T - S` noise maps.
            guidance_scale: Classifier-free guidance scale of the inversion (the reference's constant is 3.5).
            height, width: Image size in pixels, multiples of 64.
            generator: A `torch.Generator` drawing for all images in order, or one per image. The random draws follow
                the reference, so `torch.Generator().manual_seed(seed)` matches its `torch.manual_seed(seed)`.

            reference_freeu: Apply the reference's FreeU variant in every UNet call (the authors' behaviour).

        Returns:
            [`InversionResult`] with the latents where denoising starts, the noise maps and the timesteps.
        """
        images = as_image_list(image, "image")
        if images is None:
            raise TypeError("`image` must be an image or a list of images, got None.")
        num_inference_steps, skip_steps = self.check_schedule(num_inference_steps, skip_steps, height, width)
        guidance_scale = check_scale(guidance_scale, "guidance_scale")
        reference_freeu = check_bool(reference_freeu, "reference_freeu")
        prompts = self.default_prompts(prompt, domain_name, len(images))
        generators = generators_per_item(generator, len(images))

        inversion = self._invert_images(
            images,
            ["image"] * len(images),
            prompts,
            generators,
            num_inference_steps,
            skip_steps,
            guidance_scale,
            height,
            width,
            reference_freeu,
        )
        self.maybe_free_model_hooks()
        return inversion

    @torch.no_grad()
    def __call__(
        self,
        appearance_image: ImageInput | list[ImageInput] | None = None,
        structure_image: ImageInput | list[ImageInput] | None = None,
        *,
        domain_name: str | list[str] | None = None,
        prompt: str | list[str] | None = None,
        object_noun: str | list[str] | None = None,
        num_inference_steps: int = 100,
        skip_steps: int = 32,
        swap_guidance_scale: float = 3.5,
        contrast_strength: float = 1.67,
        cross_attn_32_range: RangeInput = (10, 70),
        cross_attn_64_range: RangeInput = (10, 90),
        adain_range: RangeInput = (20, 100),
        use_masked_adain: bool = True,
        appearance_mask: Any | None = None,
        structure_mask: Any | None = None,
        appearance_inversion: InversionResult | None = None,
        structure_inversion: InversionResult | None = None,
        inversion_guidance_scale: float = 3.5,
        reference_freeu: bool = True,
        height: int = 512,
        width: int = 512,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_reconstructions: bool = False,
        return_dict: bool = True,
        callback_on_step_end: Callable[["CrossImageAttentionPipeline", int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        r"""Transfer the appearance of `appearance_image` onto the structure of `structure_image`.

        Args:
            appearance_image: The image whose look is transferred: PIL (RGB), numpy (`[H, W, 3]`, uint8 or float in
                [0, 1]), a tensor (`[3, H, W]` in [0, 1]), or a list. Lists of equal length form pairs; a single
                image against a list is used for every pair. May be omitted when `appearance_inversion` is given.
            structure_image: The image whose layout and shape are kept; same forms as `appearance_image`.
            domain_name: The objects' class (e.g. ``"animal"``); sets the default prompt ``"A photo of a
                {domain_name}"`` (``"object"`` when omitted, as the reference) and the default `object_noun`.
                Required by `use_masked_adain` without masks.
            prompt: Overrides the default prompt (for inversion and denoising).
            object_noun: The word of the prompt that names the object (self-segmentation); defaults to `domain_name`.
            num_inference_steps: Length `T` of the DDIM schedule.
            skip_steps: `S`: denoising runs the last `T - S` steps, from the inverted latents at step `S`.
            swap_guidance_scale: Appearance guidance: the output's noise is extrapolated from a plain pass (no
                cross-image attention) towards the cross-image pass with a scale decaying linearly from this value
                to `max(value / 2, 1)`; `<= 1` disables it.
            contrast_strength: Contrast of the output's attention maps in cross-image attention (1 = no contrast).
            cross_attn_32_range: `(start, end)` denoising steps with cross-image attention in the decoder's second
                highest-resolution level (32x32 tokens for SD 1.5 at 512 px).
            cross_attn_64_range: `(start, end)` for the decoder's highest-resolution level (64x64 tokens).
            adain_range: `(start, end)` denoising steps after which AdaIN is applied to the output latent.
            use_masked_adain: Restrict AdaIN to the objects, using self-segmentation masks or the given masks.
            appearance_mask, structure_mask: Object masks (any size, nonzero = object), one per image or lists; when
                both are given they replace self-segmentation.
            appearance_inversion, structure_inversion: [`InversionResult`]s from
                [`~CrossImageAttentionPipeline.invert`] made with this call's steps, skip, guidance and size; the
                corresponding image is then not inverted.
            inversion_guidance_scale: Classifier-free guidance scale of the inversion.
            reference_freeu: Apply the reference's FreeU variant in every UNet call (inversion and denoising), as
                the authors' code does; False runs the plain UNet. Given inversions must have been made alike.
            height, width: Output size in pixels, multiples of 64.
            generator: A `torch.Generator`, or one per pair so that each pair's result equals its result alone.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_reconstructions: Also decode the appearance and structure branches.
            return_dict: Return a [`CrossImageAttentionPipelineOutput`] instead of a tuple.
            callback_on_step_end: Called as `callback(pipe, step, timestep, callback_kwargs)` at the end of every
                denoising step (after AdaIN); `callback_kwargs["latents"]` is the `[OUT, APP, STRUCT]` batch, and a
                returned `"latents"` replaces it.
            callback_on_step_end_tensor_inputs: Tensors passed to the callback (only ``"latents"``).

        Examples:

        Returns:
            [`CrossImageAttentionPipelineOutput`] or `tuple` in the same order.
        """
        # 1. Check every argument, the UNet's structure and given inversions, before any model runs
        args = self.check_inputs(
            appearance_image, structure_image, domain_name, prompt, object_noun, num_inference_steps, skip_steps,
            swap_guidance_scale, contrast_strength, cross_attn_32_range, cross_attn_64_range, adain_range,
            use_masked_adain, appearance_mask, structure_mask, appearance_inversion, structure_inversion,
            inversion_guidance_scale, reference_freeu, height, width, generator, output_type, callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        return_reconstructions = check_bool(return_reconstructions, "return_reconstructions")
        return_dict = check_bool(return_dict, "return_dict")
        num_pairs, device = args.num_pairs, self._execution_device

        # 2. Invert the images that came without an inversion, pair after pair, appearance before structure (the
        #    reference's draw order), all of them batched in each UNet call
        to_invert = [  # (branch, pair, image)
            (branch, pair, images[pair % len(images)])
            for pair in range(num_pairs)
            for branch, images in (("appearance", args.appearance_images), ("structure", args.structure_images))
            if images is not None
        ]
        if to_invert:
            computed = self._invert_images(
                [image for _, _, image in to_invert],
                [f"{branch}_image" for branch, _, _ in to_invert],
                [args.prompts[pair] for _, pair, _ in to_invert],
                [args.generators[pair] for _, pair, _ in to_invert],
                args.num_inference_steps,
                args.skip_steps,
                args.inversion_guidance_scale,
                height,
                width,
                reference_freeu,
            )
        inversions = {}
        for branch, given in (("appearance", appearance_inversion), ("structure", structure_inversion)):
            if given is None:
                given = computed.select([row for row, entry in enumerate(to_invert) if entry[0] == branch])
            elif given.batch_size != num_pairs:
                given = given.select([0] * num_pairs)
            inversions[branch] = given.to(device=device, dtype=torch.float32)

        # 3. Encode the prompt and plan the steps. All branches use the conditional prompt only (no classifier-free
        #    guidance while denoising), as the reference.
        conditional = self.encode_text(args.prompts, device)
        self.scheduler.set_timesteps(args.num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps[args.skip_steps :]
        self._num_timesteps = len(timesteps)
        plan = plan_denoising_steps(
            len(timesteps),
            args.cross_attn_64_range,
            args.cross_attn_32_range,
            args.adain_range,
            args.swap_guidance_scale,
            args.segment,
        )
        # A callback sees (and reconstructions need) every branch at every step; otherwise each call holds only the
        # rows its step needs.
        groups_per_step = row_groups_per_step(
            plan, every_branch=callback_on_step_end is not None or return_reconstructions
        )
        # Quirk: the output starts from the structure image's inverted latent and uses its noise maps.
        latents = {branch: inversions[branch].latents for branch in ("appearance", "structure")}
        latents["out"] = latents["structure"]
        noise = {"appearance": inversions["appearance"].noise, "structure": inversions["structure"].noise}
        noise["out"] = noise["structure"]
        pair_masks = args.pair_masks
        controller = AttentionController()

        # 4. Denoise: one UNet call per step, with cross-image attention as planned
        self._interrupt = False
        freeu = reference_freeu_hooks(self.unet) if reference_freeu else nullcontext()
        with controlled_attention(self.unet, controller, args.layers.names, device), freeu:
            for i, (t, step, groups) in enumerate(self.progress_bar(list(zip(timesteps, plan, groups_per_step)))):
                if self.interrupt:
                    continue
                rows = RowGroups.of(*((group, num_pairs) for group in groups))
                controller.begin_step(
                    rows,
                    cross_image_edits(step, args.layers, groups, args.contrast_strength),
                    segmentation_captures(step, args.layers),
                )
                batch = rows.stack({**latents, "out_plain": latents["out"]})
                eps = rows.split(self.predict_noise(batch, t, conditional.repeat(len(groups), 1, 1)))
                if "out_plain" in eps:
                    # Appearance guidance: extrapolate from the plain pass towards the cross-image pass.
                    eps["out"] = eps["out_plain"] + step.guidance_scale * (eps["out"] - eps["out_plain"])

                coeffs = ddpm_coefficients(self.scheduler, t)
                for branch in ("appearance", "structure", "out"):
                    if branch in eps:
                        latents[branch] = ddpm_step(latents[branch], eps[branch], noise[branch][:, i], coeffs)
                if "out" not in eps:  # the output still equals the structure
                    latents["out"] = latents["structure"]
                if step.capture:
                    # Masks from the attention captured during this step's UNet call, made before its AdaIN.
                    pair_masks = usable_pair_masks(
                        pair_segmentation_masks(
                            controller.captured_maps(), args.noun_positions, latents["out"].shape[-2:], num_pairs
                        )
                    )
                if step.adain:
                    latents["out"] = adain_per_pair(latents["out"], latents["appearance"], pair_masks)

                if callback_on_step_end is not None:
                    step_tensors = {"latents": torch.cat([latents[b] for b in ("out", "appearance", "structure")])}
                    callback_kwargs = {name: step_tensors[name] for name in args.callback_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    returned = callback_outputs.get("latents", step_tensors["latents"])
                    latents["out"], latents["appearance"], latents["structure"] = returned.split(num_pairs)

        # 5. Decode (the safety checker sees the transfers only)
        branches = ("out", "appearance", "structure") if return_reconstructions else ("out",)
        decoded = torch.cat([latents[b] for b in branches])
        if not torch.isfinite(decoded).all():
            raise ValueError(
                "The denoised latents are not finite; the scales (`swap_guidance_scale`, `contrast_strength`, "
                "`inversion_guidance_scale`) are probably too large for this model."
            )
        if output_type == "latent":
            images = decoded
        else:
            images = self.vae.decode(decoded.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            images[:num_pairs] = self.run_safety_checker(images[:num_pairs], device, conditional.dtype)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()

        outputs = [images[:num_pairs], None, None]
        if return_reconstructions:
            outputs = [images[:num_pairs], images[num_pairs : 2 * num_pairs], images[2 * num_pairs :]]
        outputs += [inversions["appearance"], inversions["structure"]]
        if not return_dict:
            return tuple(outputs)
        return CrossImageAttentionPipelineOutput(*outputs)
