"""Cross-Image Attention for Zero-Shot Appearance Transfer (Alaluf, Garibi et al., arXiv 2311.03335) for diffusers.

Given a structure image and an appearance image of semantically similar objects, Stable Diffusion renders the
structure image's object with the appearance image's look, with no training:

1. both images are inverted with edit-friendly DDPM inversion;
2. a batch ``[OUT, APP, STRUCT]`` is denoised with their noise maps; in the decoder's two highest-resolution
   self-attention levels, the output's queries attend to the appearance image's keys and values (cross-image
   attention) with contrasted attention maps, guided by the difference to a plain pass;
3. after each step, AdaIN (masked by self-segmentation) pulls the output's latent statistics towards the appearance.

With default arguments the pipeline reproduces the authors' implementation; its quirks are kept and commented where
they are reproduced.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import BaseOutput, logging
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from .adain import adain, mask_supports_adain, masked_adain
from .attention_processors import (
    HIGHEST_RESOLUTION_LEVEL,
    SECOND_RESOLUTION_LEVEL,
    BatchLayout,
    CrossImageAttentionController,
    cross_image_attention,
)
from .freeu import reference_freeu
from .inversion import (
    InversionResult,
    ddpm_coefficients,
    ddpm_step,
    draw_trajectory_noise,
    extract_noise_map,
    sample_noisy_trajectory,
)
from .segmentation import noun_token_positions, self_segmentation_masks

logger = logging.get_logger(__name__)

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor
RangeInput = tuple[int, int]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

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


def _check_range(value, name: str) -> RangeInput:
    if isinstance(value, range):
        value = (value.start, value.stop)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"`{name}` must be a (start, end) pair of step indices, got {value!r}.")
    start, end = value
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, end)):
        raise TypeError(f"`{name}` must hold two integers, got {value!r}.")
    if not 0 <= start <= end:
        raise ValueError(f"`{name}` must satisfy 0 <= start <= end, got {value!r}.")
    return int(start), int(end)


def _check_scale(value, name: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"`{name}` must be a finite number >= {minimum}, got {value}.")
    return float(value)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def _per_pair(value, name: str, num_pairs: int, kinds=(str,)) -> list:
    """Broadcast a value or a list of length 1 to ``num_pairs`` entries."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if item is not None and not isinstance(item, kinds):
            raise TypeError(f"`{name}` must be a {' or '.join(k.__name__ for k in kinds)} or a list of them.")
    if len(values) == 1:
        return values * num_pairs
    if len(values) != num_pairs:
        raise ValueError(f"`{name}` has {len(values)} entries but there are {num_pairs} image pairs.")
    return values


def _centre_crop_box(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int, int, int]:
    """The largest centred box of the target aspect; offsets use integer division, as the reference does."""
    if width * target_height > height * target_width:  # too wide
        new_width = round(height * target_width / target_height)
        left = (width - new_width) // 2
        return left, 0, left + new_width, height
    new_height = round(width * target_height / target_width)
    top = (height - new_height) // 2
    return 0, top, width, top + new_height


@dataclass(frozen=True)
class StepPlan:
    """What one denoising step does, by the reference's rules.

    Args:
        mixing_levels: Decoder levels where the output attends to another image's keys and values.
        use_structure_kv: The keys and values come from the structure image instead of the appearance image.
        guidance_scale: Appearance guidance scale of this step, or None when guidance is inactive.
        adain: AdaIN is applied to the output after the step.
        capture: The step's attention maps feed self-segmentation (masks are made after its DDPM update).
    """

    mixing_levels: frozenset
    use_structure_kv: bool
    guidance_scale: float | None
    adain: bool
    capture: bool


def plan_denoising_steps(
    num_steps: int,
    cross_attn_64_range: RangeInput,
    cross_attn_32_range: RangeInput,
    adain_range: RangeInput,
    swap_guidance_scale: float,
    segment: bool,
) -> list[StepPlan]:
    """The reference's gates for each loop index ``i`` of the denoising loop."""
    level_ranges = {HIGHEST_RESOLUTION_LEVEL: cross_attn_64_range, SECOND_RESOLUTION_LEVEL: cross_attn_32_range}
    guidance_start = min(cross_attn_32_range[0], cross_attn_64_range[0])
    guidance_end = max(cross_attn_32_range[1], cross_attn_64_range[1])
    guidance_scales = np.linspace(swap_guidance_scale, max(swap_guidance_scale / 2, 1.0), num_steps)
    plan = []
    for i in range(num_steps):
        # Quirk: the reference's attention gates read a step counter that is updated at the end of each step, so
        # they lag one step behind the loop index (guidance and AdaIN use the index itself).
        counter = max(i - 1, 0)
        levels = frozenset(level for level, (start, end) in level_ranges.items() if start <= counter < end)
        # Appearance guidance; the range test is inclusive at both ends, as in the reference. Where no layer mixes,
        # the plain pass equals the cross-image pass and guidance is the identity, so it is not run.
        guided = swap_guidance_scale > 1 and guidance_start <= i <= guidance_end and bool(levels)
        plan.append(
            StepPlan(
                mixing_levels=levels,
                # Every fifth step among the first forty the output takes the structure's keys and values.
                use_structure_kv=counter % 5 == 0 and counter < 40,
                guidance_scale=float(guidance_scales[i]) if guided else None,
                adain=adain_range[0] <= i < adain_range[1],
                capture=segment and i == adain_range[0],
            )
        )
    return plan


def structure_last_use(plan: list[StepPlan]) -> int:
    """The last step whose UNet call needs the structure rows (-1 if none): while the output still equals the
    structure and does not mix, it is read off the structure; structure keys/values and mask capture need them too.
    """
    last, out_is_structure = -1, True
    for i, step in enumerate(plan):
        if (out_is_structure and not step.mixing_levels) or step.capture:
            last = i
        if step.mixing_levels and step.use_structure_kv:
            last = i
        out_is_structure = out_is_structure and not (step.mixing_levels or step.adain)
    return last


class CrossImageAttentionPipeline(DiffusionPipeline):
    r"""Zero-shot appearance transfer with cross-image attention on Stable Diffusion 1.x/2.x.

    This model inherits from [`DiffusionPipeline`]; see the superclass documentation for the generic methods
    (downloading, saving, running on a device, offloading).

    Args:
        vae ([`AutoencoderKL`]): Variational autoencoder that encodes images to and decodes them from latents.
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
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        # The reference resizes with Pillow's bicubic filter (its default for RGB), not diffusers' lanczos.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self._interrupt = False

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------

    def _check_schedule(self, num_inference_steps, skip_steps, height, width) -> tuple[int, int]:
        """Validate the settings shared by inversion and transfer; returns the step counts as ints."""
        for name, value in (("height", height), ("width", width)):
            _check_int(value, name, self.size_multiple)
            if value % self.size_multiple:
                raise ValueError(f"`{name}` must be a multiple of {self.size_multiple}, got {value}.")
        num_inference_steps = _check_int(num_inference_steps, "num_inference_steps", 1)
        skip_steps = _check_int(skip_steps, "skip_steps", 0)
        if skip_steps >= num_inference_steps:
            raise ValueError(f"`skip_steps` ({skip_steps}) must be smaller than `num_inference_steps`.")
        return num_inference_steps, skip_steps

    @staticmethod
    def _as_list(images, name: str) -> list | None:
        """Split an image argument into a list of single images (4-D arrays and tensors are batches)."""
        if images is None:
            return None
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError(f"`{name}` is an empty list.")
        return images

    def _image_to_pixels(self, image: ImageInput, name: str, height: int, width: int) -> torch.Tensor:
        """One image to a `[1, 3, height, width]` float32 tensor in [-1, 1]: centre crop to the target aspect, then
        resize (Pillow bicubic for PIL images and uint8 arrays, as the reference), then ``2 x - 1``."""
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"`{name}` as a uint8 array must be [H, W, 3] RGB, got shape {image.shape}.")
            image = PIL.Image.fromarray(image)
        if isinstance(image, PIL.Image.Image):
            if image.mode != "RGB":
                raise ValueError(
                    f"`{name}` must be an RGB image, got mode {image.mode!r} (RGBA, grayscale and palette images are "
                    "not accepted); convert it with `image.convert('RGB')`."
                )
            if min(image.size) < 1:
                raise ValueError(f"`{name}` is empty ({image.size[0]}x{image.size[1]}).")
            image = image.crop(_centre_crop_box(*image.size, width, height))
            return self.image_processor.preprocess(image, height=height, width=width).float()

        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"`{name}` as a float array must be [H, W, 3] RGB, got shape {image.shape}.")
            if not np.issubdtype(image.dtype, np.floating):
                raise TypeError(f"`{name}` arrays must be uint8 or float in [0, 1], got dtype {image.dtype}.")
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        elif isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"`{name}` as a tensor must be [3, H, W] RGB, got shape {tuple(image.shape)}.")
            if not image.is_floating_point():
                raise TypeError(f"`{name}` tensors must be float in [0, 1], got dtype {image.dtype}.")
        else:
            raise TypeError(
                f"`{name}` must be a PIL image, a numpy array, a torch tensor or a list of them, "
                f"got {type(image).__name__}."
            )
        image = image.float().cpu()
        if image.numel() == 0 or not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(f"`{name}` must be a non-empty float image with values in [0, 1].")
        left, top, right, bottom = _centre_crop_box(image.shape[2], image.shape[1], width, height)
        image = image[None, :, top:bottom, left:right]
        if image.shape[-2:] != (height, width):
            image = F.interpolate(image, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        return image.clamp(0, 1) * 2 - 1

    def _mask_to_latent_grid(self, mask, name: str, height: int, width: int) -> torch.Tensor:
        """A user mask (any size; nonzero = inside) to a `[h, w]` 0/1 float mask on the latent grid: centre crop to
        the target aspect like the image, then nearest-neighbour resize."""
        if isinstance(mask, PIL.Image.Image):
            mask = np.array(mask.convert("L"))
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        if not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"`{name}` must be a PIL image, a numpy array or a torch tensor, got {type(mask).__name__}."
            )
        if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
            mask = mask.squeeze(0) if mask.shape[0] == 1 else mask.squeeze(-1)
        if mask.ndim != 2 or mask.numel() == 0:
            raise ValueError(f"`{name}` must be a 2-D [H, W] mask, got shape {tuple(mask.shape)}.")
        left, top, right, bottom = _centre_crop_box(mask.shape[1], mask.shape[0], width, height)
        mask = (mask[top:bottom, left:right] != 0).float().cpu()
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        return F.interpolate(mask[None, None], size=latent_size, mode="nearest")[0, 0]

    def _generators_per_pair(self, generator, num_pairs: int) -> list:
        if isinstance(generator, (list, tuple)):
            if len(generator) != num_pairs:
                raise ValueError(f"`generator` is a list of {len(generator)} but there are {num_pairs} image pairs.")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("`generator` list entries must be torch.Generator objects.")
            return list(generator)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}."
            )
        # One generator (or the global RNG) draws for every image, one pair after the other.
        return [generator] * num_pairs

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
        """The user's masks per pair on the latent grid (see [`_usable_masks`]), or None when none were given."""
        if (appearance_mask is None) != (structure_mask is None):
            raise ValueError("Pass both `appearance_mask` and `structure_mask`, or neither.")
        if appearance_mask is None:
            return None
        if not use_masked_adain:
            raise ValueError("Masks are only used by masked AdaIN; set `use_masked_adain=True` or drop the masks.")
        app_masks = _per_pair(appearance_mask, "appearance_mask", num_pairs, (object,))
        struct_masks = _per_pair(structure_mask, "structure_mask", num_pairs, (object,))
        return self._usable_masks(
            [
                (
                    self._mask_to_latent_grid(app_mask, "appearance_mask", height, width),
                    self._mask_to_latent_grid(struct_mask, "structure_mask", height, width),
                )
                for app_mask, struct_mask in zip(app_masks, struct_masks)
            ]
        )

    def _object_noun_positions(self, prompts: list[str], object_nouns: list) -> list:
        """Token positions of each pair's object noun in its prompt (self-segmentation scores clusters with them)."""
        if None in object_nouns:
            raise ValueError(
                "`use_masked_adain=True` needs `domain_name` (or `object_noun`) to find the object, or both "
                "`appearance_mask` and `structure_mask`; or pass `use_masked_adain=False`."
            )
        positions = [noun_token_positions(self.tokenizer, p, n) for p, n in zip(prompts, object_nouns)]
        for found, p, n in zip(positions, prompts, object_nouns):
            if not found:
                raise ValueError(f"`object_noun` {n!r} does not occur in the prompt {p!r}.")
        return positions

    def _check_inversion(
        self, inversion, name, timesteps, prompts, num_inference_steps, skip_steps, guidance, height, width
    ):
        """Refuse an inversion made with other settings than the call's (those it records, and its shapes)."""
        latent_shape = (
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        expected = {
            "num_inference_steps": num_inference_steps,
            "skip_steps": skip_steps,
            "guidance_scale": guidance,
            "height": height,
            "width": width,
        }
        for key, value in expected.items():
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
        if tuple(inversion.latents.shape[1:]) != latent_shape:
            raise ValueError(
                f"`{name}` has latents of shape {tuple(inversion.latents.shape[1:])}, but a {height}x{width} call "
                f"needs {latent_shape}."
            )
        if not torch.equal(inversion.timesteps.cpu().long(), timesteps.cpu().long()):
            raise ValueError(
                f"`{name}` holds noise maps for other timesteps than num_inference_steps={num_inference_steps}, "
                f"skip_steps={skip_steps} give; invert again with the call's settings."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Building blocks
    # ------------------------------------------------------------------------------------------------------------

    def _encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP last hidden states, padded to the tokenizer's maximum length, without attention mask (as SD)."""
        input_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(input_ids.to(device))[0]

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior **mode** (not a sample) times the scaling factor, in float32."""
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        latents = torch.cat([self.vae.encode(p[None]).latent_dist.mode() for p in pixels])
        return latents.float() * self.vae.config.scaling_factor

    def _predict_noise(self, latents: torch.Tensor, timestep, embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction in float32 (v-prediction models are converted to epsilon)."""
        output = self.unet(latents.to(self.unet.dtype), timestep, encoder_hidden_states=embeddings, return_dict=False)[
            0
        ].float()
        if self.scheduler.config.prediction_type == "v_prediction":
            alpha_prod_t = self.scheduler.alphas_cumprod[int(timestep)]
            output = alpha_prod_t**0.5 * output + (1 - alpha_prod_t) ** 0.5 * latents
        elif self.scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"Unsupported prediction_type {self.scheduler.config.prediction_type!r}.")
        return output

    def _invert_latents(
        self,
        clean_latents: torch.Tensor,
        conditional: torch.Tensor,
        unconditional: torch.Tensor,
        all_timesteps: torch.Tensor,
        skip_steps: int,
        guidance_scale: float,
        generators: list,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Edit-friendly DDPM inversion of a batch of latents.

        Args:
            clean_latents: `[K, C, h, w]` encoded images.
            conditional, unconditional: `[K, 77, D]` prompt and empty-prompt embeddings.
            all_timesteps: The full `T`-step schedule, noisiest first.
            skip_steps: `S`; only `x[S]` and `z[S:]` are returned.
            generators: One entry per image; images sharing a generator draw one after the other.

        Returns:
            `(latents [K, C, h, w], noise [K, T - S, C, h, w])`.
        """
        num_steps = len(all_timesteps)
        latent_shape = tuple(clean_latents.shape[1:])
        trajectories = []
        for image, generator in enumerate(generators):
            # Quirk kept for seed compatibility: the reference draws one noise per timestep for all T steps, least
            # noisy first, image after image, even for the steps it later skips.
            def draw(generator=generator):
                return draw_trajectory_noise(latent_shape, generator, clean_latents.device)

            trajectories.append(
                sample_noisy_trajectory(clean_latents[image : image + 1], self.scheduler, all_timesteps, draw)
            )

        # Each noise map depends only on the sampled x[k], x[k+1] and the prediction at x[k], so only the steps that
        # denoising uses are computed: k >= S, and k = S - 1 whose re-computed x[S] (mu + sigma z, equal to the
        # sample up to rounding) is where the reference starts. z[T-1] is zeroed by the reference, so its UNet call
        # is skipped too.
        first_step = max(skip_steps - 1, 0)
        noise_maps = torch.zeros((len(generators), num_steps - skip_steps) + tuple(clean_latents.shape[1:]))
        noise_maps = noise_maps.to(clean_latents.device)
        start_latents = torch.cat([trajectory[skip_steps] for trajectory in trajectories])
        embeddings = torch.cat([unconditional, conditional])
        with self.progress_bar(total=num_steps - 1 - first_step) as progress_bar:
            for k in range(num_steps - 2, first_step - 1, -1):  # from the least noisy step to the noisiest
                t = all_timesteps[k]
                sample = torch.cat([trajectory[k] for trajectory in trajectories])
                less_noisy = torch.cat([trajectory[k + 1] for trajectory in trajectories])
                eps_uncond, eps_cond = self._predict_noise(torch.cat([sample, sample]), t, embeddings).chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                noise, recomputed = extract_noise_map(sample, less_noisy, eps, ddpm_coefficients(self.scheduler, t))
                if k >= skip_steps:
                    noise_maps[:, k - skip_steps] = noise
                if k + 1 == skip_steps:
                    start_latents = recomputed
                progress_bar.update()
        return start_latents, noise_maps

    def _invert_images(
        self, images, names, prompts, generators, num_inference_steps, skip_steps, guidance_scale, height, width
    ) -> InversionResult:
        """Preprocess, encode and invert images (batched in each UNet call); ``names`` label errors per image."""
        device = self._execution_device
        pixels = torch.cat([self._image_to_pixels(im, name, height, width) for im, name in zip(images, names)])
        clean_latents = self._encode_images(pixels)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        all_timesteps = self.scheduler.timesteps
        conditional = self._encode_text(prompts, device)
        unconditional = self._encode_text([""], device).expand_as(conditional)
        with reference_freeu(self.unet):
            latents, noise = self._invert_latents(
                clean_latents, conditional, unconditional, all_timesteps, skip_steps, guidance_scale, generators
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
        )

    def _segment(self, captured: dict[str, torch.Tensor], noun_positions, latent_grid, num_pairs) -> list:
        """Self-segmentation masks: for each pair, the `[h, w]` masks of the appearance and the structure image."""
        if "cross" not in captured:
            raise ValueError("Self-segmentation needs a cross-attention layer at the decoder's second level.")
        tokens = captured["self"].shape[-1]
        factor = math.sqrt(latent_grid[0] * latent_grid[1] / tokens)
        grid = (round(latent_grid[0] / factor), round(latent_grid[1] / factor))
        pair_masks = []
        for pair in range(num_pairs):
            rows = [pair, num_pairs + pair]
            masks = self_segmentation_masks(
                captured["self"][rows], captured["cross"][rows], noun_positions[pair], grid
            )
            if grid != tuple(latent_grid):
                masks = F.interpolate(masks[:, None], size=latent_grid, mode="nearest")[:, 0]
            pair_masks.append((masks[0], masks[1]))
        return pair_masks

    @staticmethod
    def _apply_adain(out_latents, app_latents, pair_masks: list | None) -> torch.Tensor:
        """AdaIN of every output latent towards its appearance latent, masked for pairs that have usable masks."""
        results = []
        for pair, (content, style) in enumerate(zip(out_latents, app_latents)):
            masks = pair_masks[pair] if pair_masks is not None else None
            if masks is None:
                results.append(adain(content, style))
            else:
                app_mask, struct_mask = (m.to(content.device) for m in masks)
                results.append(masked_adain(content, style, struct_mask, app_mask))
        return torch.stack(results)

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
    ) -> InversionResult:
        """Invert images with edit-friendly DDPM inversion (the reference's FreeU is active in every UNet call).

        Args:
            image: A PIL image (RGB), a numpy array (`[H, W, 3]`, uint8 or float in [0, 1]), a tensor (`[3, H, W]` in
                [0, 1]), or a list of them. Images are centre-cropped to the target aspect and resized.
            prompt: The inversion prompt; defaults to ``"A photo of a {domain_name}"``, or ``""`` without a domain.
            domain_name: The object class, e.g. ``"animal"``.
            num_inference_steps: Length `T` of the DDIM timestep schedule.
            skip_steps: `S`, the noisiest steps that are skipped; the result holds `T - S` noise maps.
            guidance_scale: Classifier-free guidance scale of the inversion (the reference's constant is 3.5).
            height, width: Image size in pixels, multiples of 64.
            generator: A `torch.Generator` drawing for all images in order, or one per image. The random draws follow
                the reference, so `torch.Generator().manual_seed(seed)` matches its `torch.manual_seed(seed)`.

        Returns:
            [`InversionResult`] with the latents where denoising starts, the noise maps and the timesteps.
        """
        images = self._as_list(image, "image")
        num_images = len(images)
        num_inference_steps, skip_steps = self._check_schedule(num_inference_steps, skip_steps, height, width)
        guidance_scale = _check_scale(guidance_scale, "guidance_scale")
        prompts = self._prompts(prompt, domain_name, num_images)
        generators = self._generators_per_pair(generator, num_images)

        inversion = self._invert_images(
            images,
            ["image"] * num_images,
            prompts,
            generators,
            num_inference_steps,
            skip_steps,
            guidance_scale,
            height,
            width,
        )
        self.maybe_free_model_hooks()
        return inversion

    @staticmethod
    def _prompts(prompt, domain_name, count: int) -> list[str]:
        prompts = _per_pair(prompt, "prompt", count)
        domains = _per_pair(domain_name, "domain_name", count)
        # The reference's default prompt; without a domain name the prompt is empty (unconditional).
        return [
            p if p is not None else (f"A photo of a {d}" if d is not None else "") for p, d in zip(prompts, domains)
        ]

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
                {domain_name}"`` and the default `object_noun`. Required by `use_masked_adain` without masks.
            prompt: Overrides the default prompt (for inversion and denoising).
            object_noun: The word of the prompt that names the object (self-segmentation); defaults to `domain_name`.
            num_inference_steps: Length `T` of the DDIM schedule.
            skip_steps: `S`: denoising runs the last `T - S` steps, from the inverted latents at step `S`.
            swap_guidance_scale: Appearance guidance: the output's noise is extrapolated from a plain pass towards the
                cross-image pass with a scale decaying linearly from this value to `max(value / 2, 1)`; `<= 1`
                disables it.
            contrast_strength: Contrast of the output's attention maps in mixing layers (1 = no contrast).
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
        # 1. Check the arguments; bring every per-pair argument to one entry per pair
        num_inference_steps, skip_steps = self._check_schedule(num_inference_steps, skip_steps, height, width)
        swap_guidance_scale = _check_scale(swap_guidance_scale, "swap_guidance_scale")
        contrast_strength = _check_scale(contrast_strength, "contrast_strength")
        inversion_guidance_scale = _check_scale(inversion_guidance_scale, "inversion_guidance_scale")
        cross_attn_32_range = _check_range(cross_attn_32_range, "cross_attn_32_range")
        cross_attn_64_range = _check_range(cross_attn_64_range, "cross_attn_64_range")
        adain_range = _check_range(adain_range, "adain_range")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` may only hold {self._callback_tensor_inputs}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("`callback_on_step_end` must be callable.")

        appearance_images = self._as_list(appearance_image, "appearance_image")
        structure_images = self._as_list(structure_image, "structure_image")
        num_pairs = self._count_pairs(
            ("appearance", appearance_images, appearance_inversion),
            ("structure", structure_images, structure_inversion),
        )
        prompts = self._prompts(prompt, domain_name, num_pairs)
        domains = _per_pair(domain_name, "domain_name", num_pairs)
        object_nouns = [
            noun if noun is not None else domain
            for noun, domain in zip(_per_pair(object_noun, "object_noun", num_pairs), domains)
        ]
        generators = self._generators_per_pair(generator, num_pairs)

        # Per pair: (appearance mask, structure mask) on the latent grid, or None for plain AdaIN.
        pair_masks = self._given_masks(appearance_mask, structure_mask, use_masked_adain, num_pairs, height, width)
        # Masks come from self-segmentation when masked AdaIN is on, no masks were given and AdaIN runs at all.
        num_steps = num_inference_steps - skip_steps
        segment = use_masked_adain and pair_masks is None and adain_range[0] < min(adain_range[1], num_steps)
        noun_positions = self._object_noun_positions(prompts, object_nouns) if segment else None

        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        all_timesteps = self.scheduler.timesteps
        timesteps = all_timesteps[skip_steps:]
        for name, inversion in (
            ("appearance_inversion", appearance_inversion),
            ("structure_inversion", structure_inversion),
        ):
            if inversion is not None:
                self._check_inversion(
                    inversion,
                    name,
                    timesteps,
                    prompts,
                    num_inference_steps,
                    skip_steps,
                    inversion_guidance_scale,
                    height,
                    width,
                )

        # 2. Invert the images that came without an inversion, pair after pair, appearance before structure (the
        #    reference's draw order), all of them batched in each UNet call
        to_invert = []  # (branch, pair, image)
        for pair in range(num_pairs):
            for branch, images in (("appearance", appearance_images), ("structure", structure_images)):
                if images is not None:
                    to_invert.append((branch, pair, images[pair % len(images)]))
        if to_invert:
            computed = self._invert_images(
                [image for _, _, image in to_invert],
                [f"{branch}_image" for branch, _, _ in to_invert],
                [prompts[pair] for _, pair, _ in to_invert],
                [generators[pair] for _, pair, _ in to_invert],
                num_inference_steps,
                skip_steps,
                inversion_guidance_scale,
                height,
                width,
            )
        inversions = {}
        for branch, given in (("appearance", appearance_inversion), ("structure", structure_inversion)):
            if given is None:
                given = computed.select([row for row, entry in enumerate(to_invert) if entry[0] == branch])
            elif given.batch_size != num_pairs:
                given = given.select([0] * num_pairs)
            inversions[branch] = given.to(device=device, dtype=torch.float32)
        app_inv, struct_inv = inversions["appearance"], inversions["structure"]

        # 3. Prepare the branches. Quirk: the output starts from the structure image's inverted latent and uses the
        #    structure image's noise maps. All branches use the conditional prompt only (no classifier-free
        #    guidance while denoising), as the reference.
        conditional = self._encode_text(prompts, device)
        app_latents, struct_latents = app_inv.latents, struct_inv.latents
        out_latents = struct_latents
        plan = plan_denoising_steps(
            num_steps, cross_attn_64_range, cross_attn_32_range, adain_range, swap_guidance_scale, segment
        )
        # A callback sees the whole [OUT, APP, STRUCT] batch at every step, so then every branch is computed.
        full_batch = callback_on_step_end is not None
        structure_until = num_steps - 1 if full_batch or return_reconstructions else structure_last_use(plan)
        # OUT equals STRUCT until the first step that mixes or applies AdaIN: until then it is not computed twice.
        out_is_structure = not full_batch
        controller = CrossImageAttentionController(num_pairs=num_pairs, contrast_strength=contrast_strength)
        latent_grid = tuple(app_latents.shape[-2:])

        # 4. Denoise: one UNet call per step holding only the rows the step needs
        self._interrupt = False
        with cross_image_attention(self.unet, controller, device), reference_freeu(self.unet):
            with self.progress_bar(total=num_steps) as progress_bar:
                for i, (t, step) in enumerate(zip(timesteps, plan)):
                    if self.interrupt:
                        continue
                    layout = BatchLayout(
                        num_pairs,
                        out=not out_is_structure or bool(step.mixing_levels),
                        out_plain=step.guidance_scale is not None,
                        structure=i <= structure_until,
                    )
                    controller.layout = layout
                    controller.mixing_levels = step.mixing_levels
                    controller.use_structure_kv = step.use_structure_kv
                    controller.capture = step.capture
                    rows = {
                        "out": out_latents,
                        "out_plain": out_latents,
                        "appearance": app_latents,
                        "structure": struct_latents,
                    }
                    noise_pred = self._predict_noise(
                        torch.cat([rows[group] for group in layout.groups]),
                        t,
                        conditional.repeat(len(layout.groups), 1, 1),
                    )
                    eps = {group: noise_pred[layout.rows(group)] for group in layout.groups}

                    coeffs = ddpm_coefficients(self.scheduler, t)
                    app_latents = ddpm_step(app_latents, eps["appearance"], app_inv.noise[:, i], coeffs)
                    if layout.structure:
                        struct_latents = ddpm_step(struct_latents, eps["structure"], struct_inv.noise[:, i], coeffs)
                    if layout.out:
                        out_eps = eps["out"]
                        if layout.out_plain:
                            # Appearance guidance: extrapolate from the plain pass towards the cross-image pass.
                            out_eps = eps["out_plain"] + step.guidance_scale * (eps["out"] - eps["out_plain"])
                        out_latents = ddpm_step(out_latents, out_eps, struct_inv.noise[:, i], coeffs)
                        out_is_structure = False
                    else:
                        out_latents = struct_latents

                    if step.capture:
                        # Masks from the attention captured during this step's UNet call, made before its AdaIN.
                        pair_masks = self._usable_masks(
                            self._segment(controller.captured, noun_positions, latent_grid, num_pairs)
                        )
                        controller.captured.clear()
                    if step.adain:
                        out_latents = self._apply_adain(out_latents, app_latents, pair_masks)
                        out_is_structure = False

                    if callback_on_step_end is not None:
                        step_tensors = {"latents": torch.cat([out_latents, app_latents, struct_latents])}
                        callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        latents = callback_outputs.pop("latents", step_tensors["latents"])
                        out_latents, app_latents, struct_latents = latents.split(num_pairs)
                    progress_bar.update()

        # 5. Decode
        decoded = torch.cat([out_latents, app_latents, struct_latents]) if return_reconstructions else out_latents
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

    @staticmethod
    def _usable_masks(pair_masks: list) -> list:
        """Replace the masks of a pair by None (plain AdaIN) when one of them is (near-)empty.

        The reference computes masked statistics regardless; with fewer than two pixels they are NaN and the whole
        output turns black (its open "black image" issue). Falling back to plain AdaIN keeps the output finite.
        """
        usable = []
        for pair, masks in enumerate(pair_masks):
            if all(mask_supports_adain(mask) for mask in masks):
                usable.append(masks)
            else:
                logger.warning(
                    "An object mask of pair %d covers fewer than two latent pixels, so masked AdaIN would give NaN; "
                    "plain AdaIN is used for this pair instead.",
                    pair,
                )
                usable.append(None)
        return usable
