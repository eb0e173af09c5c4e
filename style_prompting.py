"""Visual Style Prompting (Jeong et al., arXiv 2402.12974): what the SDXL and the SD 1.x/2.x pipelines share.

One batch holds a style reference row and the generated rows. In the decoder's late self-attention layers every
generated row keeps its queries and takes the reference row's keys and values, in each classifier-free guidance half
(a [`KeyValueInjection`] from ``<half>/reference`` to ``<half>/generated``: one fused ``sdpa(Q, K_ref, V_ref)``).
The reference row is either generated from a prompt alongside (flow A, the authors' ``vsp_script.py``) or re-noised
every step from a real image (flow B, ``vsp_real_script.py``, with the authors' forked DDIM and colour calibration).

This module holds the rules, the presets and [`StylePromptingMixin`], the call machinery both pipelines use (inputs,
latents, the denoising loop, decoding); each pipeline file adds its text encoding and components. Quirks of the
authors' code that the defaults reproduce are named where they are reproduced (numbers as in
``REFERENCE-VSP.md`` section 12).
"""

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .attention_control import AttentionController, KeyValueInjection, RowGroups
from .attention_processors import controlled_attention, list_attention_layers
from .inputs import (
    as_image_list,
    check_callback,
    check_int,
    check_output_type,
    check_range,
    check_scale,
    check_size,
    generators_per_item,
    image_to_pixels,
    per_item,
)
from .sd_glue import size_multiple_of

# Quirk 1 ("advanced sampling"): the first three steps use a hard-coded guidance scale of 20.
EARLY_GUIDANCE_SCALE = 20.0
EARLY_GUIDANCE_STEPS = 3
# Flow B's colour calibration window in timesteps, strict at both ends: the script's start 150 and window 50.
COLOR_CALIBRATION = (150, 100)
CALIBRATION_EPSILON = 1e-8
# The authors' ControlNet scripts' `--controlnet_scale` default.
CONTROLNET_CONDITIONING_SCALE = 0.5
SUPPORTED_SCHEDULERS = tuple(scheduler.name for scheduler in KarrasDiffusionSchedulers)


class _Auto:
    """Default of the arguments whose reference value depends on the flow (see each argument)."""

    def __repr__(self) -> str:
        return "<auto>"


AUTO = _Auto()


@dataclass
class StylePromptingPipelineOutput(BaseOutput):
    """Output of [`StylePromptingXLPipeline`] and [`StylePromptingPipeline`].

    Args:
        images: The generated images in the reference's style (PIL images, a numpy array, a tensor, or latents).
        reference_images: The reference row as one image: the generated reference (flow A), or the reference row
            after the last step (flow B, close to a reconstruction of the real image).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    reference_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


# ---------------------------------------------------------------------------------------------------------------------
# Presets: the authors' configs (config/*.json) with their prompt templates (STYLE_DESCRIPTION_DICT)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StylePreset:
    """One of the authors' style configs: a reference made from ``template`` with ``reference_object`` and the
    reference seed, and generated images of ``target_object`` with the inference seeds.

    Args:
        name: The config's name.
        template: The style description, ``"{object}"`` is replaced by the object.
        negative_prompt: The style's negative prompt, for every row (``""`` is encoded, not zeros).
        reference_object: The reference's object.
        reference_seed: Seed of the reference's initial latent.
        target_object: The generated images' object.
        seeds: Seeds of the generated images' initial latents.
        sdxl_style_layers: `style_layers` on SDXL (None: the default level; 16 is the slice ``[108, 140)``).
        sd_style_layers: The same on SD 1.x/2.x (4 is ``up_blocks.2.attentions.2`` plus ``up_blocks.3``).
    """

    name: str
    template: str
    negative_prompt: str
    reference_object: str
    reference_seed: int
    target_object: str
    seeds: tuple[int, ...] = tuple(range(10))
    sdxl_style_layers: int | None = None
    sd_style_layers: int | None = None

    def prompt(self, obj: str) -> str:
        return self.template.replace("{object}", obj)

    def style_layers(self, sdxl: bool) -> int | None:
        return self.sdxl_style_layers if sdxl else self.sd_style_layers


_LOW_POLY = (
    "low-poly style of {object} . low-poly game art, polygon mesh, jagged, blocky, wireframe edges, "
    "centered composition"
)
_LOW_POLY_NEGATIVE = "noisy, sloppy, messy, grainy, highly detailed, ultra textured, photo"
_LINE_ART = (
    "line art drawing of {object} . professional, sleek, modern, minimalist, graphic, line art, vector graphics"
)
_ANIME_NEGATIVE = "photo, deformed, black and white, realism, disfigured, low contrast"
_DOG = "A photo of a dog"
PRESETS = MappingProxyType(
    {
        preset.name: preset
        for preset in (
            StylePreset(
                "chinese-ink-paint", "{object} in colorful chinese ink paintings style", "", "A horse", 1, "A tiger"
            ),
            StylePreset(
                "cloud", "Photography of {object}, realistic", "", "a Cloud in the sky", 3, _DOG, tuple(range(6))
            ),
            StylePreset(
                "digital-art", "{object} in digital glitch arts style", "", "A robot", 42, "A woman playing basketball"
            ),
            # Quirk 10: the fire template ends with a stray apostrophe, kept as the authors ran it.
            StylePreset("fire", "{object} photography, realistic, black background'", "", "fire", 3, "A dragon"),
            StylePreset("klimt", "{object} in style of Gustav Klimt", "", "the kiss", 1, "Frog"),
            StylePreset("line-art", _LINE_ART, "", "an owl", 42, "A dragon"),
            StylePreset("low-poly", _LOW_POLY, _LOW_POLY_NEGATIVE, "A cat", 42, "A rhino"),
            StylePreset("munch", "{object} in Edvard Munch style", "", "The scream", 1, "A dragon"),
            StylePreset(
                "totoro",
                "{object}, art by studio ghibli, cinematic, masterpiece,key visual, studio anime, highly detailed",
                _ANIME_NEGATIVE,
                "totoro holding a tiny umbrella in the rain",
                42,
                "1 cute bird holding a tiny umbrella, forward facing",
                sdxl_style_layers=16,
                sd_style_layers=4,
            ),
            StylePreset("van-gogh", "{object}, Van Gogh", "", "The Starry Night", 1, "A dragon"),
            # The four styles of config/default.json, under the names of the authors' style dictionary.
            StylePreset(
                "anime",
                "anime artwork of {object} . anime style, key visual, vibrant, studio anime, highly detailed",
                _ANIME_NEGATIVE,
                "cat",
                42,
                _DOG,
            ),
            StylePreset(
                "Artstyle_Pop_Art",
                "pop Art style of {object} . bright colors, bold outlines, popular culture themes, ironic or kitsch",
                "ugly, deformed, noisy, blurry, low contrast, realism, photorealistic, minimalist",
                "cat",
                42,
                _DOG,
            ),
            StylePreset("low_poly", _LOW_POLY, _LOW_POLY_NEGATIVE, "cat", 42, _DOG),
            StylePreset(
                "line_art",
                _LINE_ART,
                "anime, photorealistic, 35mm film, deformed, glitch, blurry, noisy, off-center, deformed, "
                "cross-eyed, closed eyes, bad anatomy, ugly, disfigured, mutated, realism, realistic, impressionism, "
                "expressionism, oil, acrylic",
                "cat",
                42,
                _DOG,
            ),
        )
    }
)

# vsp_real_script.py's prompts for its bundled paintings, by file name before the first dot: the reference prompt is
# the template with the painting's name, the generated images' prompt the template with the object.
REAL_IMAGE_TEMPLATES = MappingProxyType(
    {
        "kids drawing": "kids drawing of {prompt}. crayon, colored pencil, marker",
        "self portrait": "{prompt} of van gogh",
        "Sunflowers": "{prompt} of van gogh",
        "The kiss": "{prompt} of gustav klimt",
        "Vitruvian Man": "{prompt} of leonardo da vinci",
        "Weeping woman": "{prompt} of pablo picasso",
        "The scream": "{prompt} of edvard munch",
        "The starry night": "{prompt} of van gogh",
        "Starry night over the rhone": "{prompt} of van gogh",
    }
)


# ---------------------------------------------------------------------------------------------------------------------
# The rules: layers, steps, rows, guidance, colour calibration
# ---------------------------------------------------------------------------------------------------------------------


def select_style_layers(unet, style_layers) -> list[str]:
    """Processor names of the self-attention layers whose keys and values come from the reference.

    Args:
        unet: The `UNet2DConditionModel`.
        style_layers: None for the decoder's highest-resolution attention level (SDXL: the 6 of ``up_blocks.1``;
            SD 1.5: the 3 of ``up_blocks.3``), an int ``k`` for the last ``k`` decoder self-attention layers in
            forward order, or a list of processor names (the ``.processor`` suffix may be left out).
    """
    layers = list_attention_layers(unet)
    decoder = [layer for layer in layers if layer.place == "up" and layer.is_self_attention]
    if not decoder:
        raise ValueError("The UNet has no decoder self-attention layers, so it cannot take a style reference.")
    if style_layers is None:
        top = min(layer.level for layer in layers if layer.place == "up")
        return [layer.name for layer in decoder if layer.level == top]
    if isinstance(style_layers, (int, np.integer)) and not isinstance(style_layers, bool):
        if not 0 <= style_layers <= len(decoder):
            raise ValueError(
                f"`style_layers` as an int must be between 0 and the {len(decoder)} decoder self-attention layers, "
                f"got {style_layers}."
            )
        return [layer.name for layer in decoder[len(decoder) - int(style_layers) :]]
    if not isinstance(style_layers, (list, tuple)) or not all(isinstance(name, str) for name in style_layers):
        raise TypeError(f"`style_layers` must be None, an int or a list of processor names, got {style_layers!r}.")
    names = {name if name.endswith(".processor") else f"{name}.processor" for name in style_layers}
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted(names - set(by_name))
    if unknown:
        raise ValueError(f"`style_layers` names layers the UNet does not have: {unknown}.")
    # Quirk 3: the reference's selections are slices of all 140 processors and so hold cross-attention layers too;
    # only self-attention is swapped and the cross-attention layers are left as they are.
    return [layer.name for layer in layers if layer.name in names and layer.is_self_attention]


def check_style_steps(style_steps) -> tuple[tuple[int, int], ...] | None:
    """None (every step), one half-open ``(start, end)`` window of loop indices, or a list of them."""
    if style_steps is None:
        return None
    if isinstance(style_steps, range) or (
        isinstance(style_steps, (tuple, list))
        and len(style_steps) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in style_steps)
    ):
        return (check_range(style_steps, "style_steps"),)
    if not isinstance(style_steps, (tuple, list)):
        raise TypeError(f"`style_steps` must be None, a (start, end) pair or a list of pairs, got {style_steps!r}.")
    return tuple(check_range(window, "style_steps") for window in style_steps)


def check_prompts(
    prompt, reference_prompt, negative_prompt, reference_negative_prompt, num_images_per_prompt
) -> tuple[list[str], list[str | None], str | None]:
    """The prompts and negative prompts of the generated rows (prompt-major, as diffusers) and the reference's
    negative prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
    if not isinstance(reference_prompt, str):
        raise TypeError(
            "`reference_prompt` must be a string describing the reference (required, also with `reference_image`), "
            f"got {reference_prompt!r}."
        )
    num_images_per_prompt = check_int(num_images_per_prompt, "num_images_per_prompt", 1)
    negatives = per_item(negative_prompt, "negative_prompt", len(prompt))
    if reference_negative_prompt is AUTO:
        if len(set(negatives)) > 1:
            raise ValueError("Pass `reference_negative_prompt` when `negative_prompt` differs between prompts.")
        reference_negative_prompt = negatives[0]
    elif reference_negative_prompt is not None and not isinstance(reference_negative_prompt, str):
        raise TypeError(f"`reference_negative_prompt` must be a string or None, got {reference_negative_prompt!r}.")
    repeat = range(num_images_per_prompt)
    return [p for p in prompt for _ in repeat], [n for n in negatives for _ in repeat], reference_negative_prompt


def images_per_prompt(num_images_per_prompt, prompt, generator, latents):
    """`num_images_per_prompt`; left at 1, as many as a list of generators or the given latents hold per prompt (one
    generator per generated image, as the issue's examples call it)."""
    rows = len(generator) if isinstance(generator, (list, tuple)) else None
    if rows is None and isinstance(latents, torch.Tensor) and latents.ndim == 4:
        rows = latents.shape[0]
    num_prompts = len(prompt) if isinstance(prompt, (list, tuple)) and prompt else 1
    if num_images_per_prompt == 1 and rows and rows % num_prompts == 0:
        return rows // num_prompts
    return num_images_per_prompt


def check_color_calibration(color_calibration, real: bool) -> tuple[float, float] | None:
    """``(start, end)`` timesteps with ``start > end``; ``AUTO`` is the real-image script's window or None."""
    if color_calibration is AUTO:
        return COLOR_CALIBRATION if real else None
    if color_calibration is None:
        return None
    if not real:
        raise ValueError("`color_calibration` needs a `reference_image` (it is part of the real-image flow).")
    if not isinstance(color_calibration, (tuple, list)) or len(color_calibration) != 2:
        raise TypeError(f"`color_calibration` must be a (start, end) pair of timesteps, got {color_calibration!r}.")
    # Timesteps, not scales: any finite value (the window simply never opens beyond the schedule).
    start, end = (check_scale(value, "color_calibration", maximum=math.inf) for value in color_calibration)
    if start <= end:
        raise ValueError(f"`color_calibration` must be (start, end) with start > end, got {color_calibration!r}.")
    return start, end


@dataclass(frozen=True)
class StyleStep:
    """What one denoising step does.

    Args:
        guidance_scale: Classifier-free guidance scale, or None for a step without guidance (conditional rows only).
        swap: The generated rows take the reference's keys and values in the style layers.
        calibrate: Colour calibration of the predicted x0 (flow B).
    """

    guidance_scale: float | None
    swap: bool
    calibrate: bool


def plan_style_steps(timesteps: Sequence, request: "StyleRequest") -> list[StyleStep]:
    """The reference's rules for each loop index ``i`` (one UNet call per index).

    The reference judges its step windows ``[a, b]`` (both ends inclusive) by a per-layer call counter that equals
    the loop index for up to 50 steps; here windows are half-open loop-index ranges, so its ``[a, b]`` is ``(a, b +
    1)``.
    """
    windows, calibration, plan = request.style_windows, request.color_calibration, []
    for i, t in enumerate(timesteps):
        early = request.early_guidance_scale is not None and i < request.early_guidance_steps
        scale = request.early_guidance_scale if early else request.guidance_scale
        plan.append(
            StyleStep(
                # As diffusers: a scale <= 1 runs no unconditional rows (the reference always runs them).
                guidance_scale=scale if scale > 1 else None,
                swap=windows is None or any(start <= i < end for start, end in windows),
                # Quirk 8: the calibration window is strict at both ends.
                calibrate=calibration is not None and calibration[0] > float(t) > calibration[1],
            )
        )
    return plan


def style_row_groups(num_generated: int, guided: bool) -> RowGroups:
    """The rows of one UNet call: reference first in each classifier-free guidance half, unconditional half first."""
    cond = (("cond/reference", 1), ("cond/generated", num_generated))
    return (
        RowGroups.of(("uncond/reference", 1), ("uncond/generated", num_generated), *cond)
        if guided
        else RowGroups.of(*cond)
    )


def style_edits(layer_names: Sequence[str], row_groups: RowGroups) -> dict[str, list[KeyValueInjection]]:
    """Quirk 3: in each half, every generated row attends only to the reference row's keys and values (replaced,
    not concatenated); queries and the reference row are untouched."""
    halves = [name.split("/")[0] for name in row_groups.names if name.endswith("/reference")]
    edits = [KeyValueInjection(receiver=f"{half}/generated", donor=f"{half}/reference") for half in halves]
    return {name: edits for name in layer_names}


def select_rows(batch: torch.Tensor, full: RowGroups, groups: RowGroups) -> torch.Tensor:
    """The rows of ``groups`` taken from ``batch``, laid out as ``full``."""
    return torch.cat([batch[full.rows(name)] for name in groups.names])


def guide(noise: torch.Tensor, row_groups: RowGroups, scale: float | None) -> torch.Tensor:
    """Classifier-free guidance on the whole batch (quirk 2: the reference row too); ``[n, ...]`` rows out."""
    if scale is None:
        return noise
    uncond, cond = noise.chunk(2)
    return uncond + scale * (cond - uncond)


def calibrate_colors(x0: torch.Tensor) -> torch.Tensor:
    """Quirk 8: every row (the reference included) gets, per channel, the mean and unbiased standard deviation of row
    0 (the reference, before the change); the epsilon is on the source side only."""
    reference = x0[:1]
    mean, std = x0.mean(dim=(-2, -1), keepdim=True), x0.std(dim=(-2, -1), keepdim=True)
    ref_mean, ref_std = reference.mean(dim=(-2, -1), keepdim=True), reference.std(dim=(-2, -1), keepdim=True)
    return (x0 - mean) / (std + CALIBRATION_EPSILON) * ref_std + ref_mean


# ---------------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------------


class SchedulerSampler:
    """Flow A: the pipeline's diffusers scheduler (the checkpoint's Euler by default), as the reference.

    Args:
        scheduler: A scheduler of `SUPPORTED_SCHEDULERS`, its timesteps already set.
        generator: Passed to stochastic schedulers' steps (a single generator, or None for the global RNG).
    """

    def __init__(self, scheduler, generator: torch.Generator | None):
        self.scheduler = scheduler
        accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
        self.step_kwargs = {"generator": generator} if accepts_generator else {}

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def init_noise_sigma(self) -> float:
        return self.scheduler.init_noise_sigma

    def scale_model_input(self, sample: torch.Tensor, t) -> torch.Tensor:
        return self.scheduler.scale_model_input(sample, t)

    def step(self, noise: torch.Tensor, t, latents: torch.Tensor, step: StyleStep) -> torch.Tensor:
        return self.scheduler.step(noise, t, latents, **self.step_kwargs, return_dict=False)[0]


class ReferenceDDIMSampler:
    """Flow B: the authors' forked DDIM (eta 0) with colour calibration of the predicted x0.

    Its timesteps are leading-spaced whatever the config says (hard-wired in the fork):
    ``t_k = (S - 1 - k) * (T // S) + steps_offset``.

    Args:
        scheduler_config: The pipeline scheduler's config (betas, ``steps_offset``, ``set_alpha_to_one``,
            ``prediction_type``).
        num_inference_steps: ``S``.
        device: Where the timesteps and coefficients live.
    """

    init_noise_sigma = 1.0

    def __init__(self, scheduler_config, num_inference_steps: int, device):
        ddim = DDIMScheduler.from_config(scheduler_config)  # only for the training schedule's alphas_cumprod
        self.alphas_cumprod = ddim.alphas_cumprod.to(device)
        self.final_alpha_cumprod = ddim.final_alpha_cumprod.to(device)
        self.prediction_type = ddim.config.prediction_type
        self.step_ratio = ddim.config.num_train_timesteps // num_inference_steps
        indices = torch.arange(num_inference_steps - 1, -1, -1, device=device)
        self.timesteps = indices * self.step_ratio + ddim.config.steps_offset

    def scale_model_input(self, sample: torch.Tensor, t) -> torch.Tensor:
        return sample

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        alpha = self.alphas_cumprod[t]
        return alpha**0.5 * clean + (1 - alpha) ** 0.5 * noise

    def step(self, noise: torch.Tensor, t, latents: torch.Tensor, step: StyleStep) -> torch.Tensor:
        alpha = self.alphas_cumprod[t]
        previous = int(t) - self.step_ratio
        alpha_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        if self.prediction_type == "v_prediction":  # not in the reference (SDXL predicts epsilon)
            noise = alpha**0.5 * noise + (1 - alpha) ** 0.5 * latents
        x0 = (latents - (1 - alpha) ** 0.5 * noise) / alpha**0.5
        if step.calibrate:
            x0 = calibrate_colors(x0)
        # Quirk 8: the update uses the original noise prediction, not one re-derived from the calibrated x0.
        return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * noise


def renoise_reference(
    latents: torch.Tensor, t, draw_clean: Callable, sampler: ReferenceDDIMSampler, generator
) -> torch.Tensor:
    """Quirk 7: before every UNet call the reference row is the real image noised to ``t``, from a fresh VAE
    posterior sample, then noise drawn for *all* rows (only row 0's is used), in that order from one generator."""
    clean = draw_clean(generator)  # [1, C, h, w]
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    latents = latents.clone()
    latents[:1] = sampler.add_noise(clean.to(latents.dtype), noise[:1], t)
    return latents


# ---------------------------------------------------------------------------------------------------------------------
# The call
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StyleRequest:
    """A call's arguments after [`StylePromptingMixin.check_inputs`]: one entry per generated row where it applies.

    Args:
        prompts, negative_prompts: Per generated row (a negative of None follows ``force_zeros_for_empty_prompt``).
        reference_prompt, reference_negative_prompt: The reference row's.
        num_inference_steps, guidance_scale, early_guidance_steps: As passed.
        early_guidance_scale: Resolved from ``AUTO``.
        layer_names: The style layers' processor names.
        style_windows: Half-open loop-index windows with swapping, or None for every step.
        color_calibration: ``(start, end)`` timesteps, resolved from ``AUTO``; None for none.
        generator: One generator per generated row, one for all, or None (the global RNG).
        reference_pixels: The real reference image as `[1, 3, H, W]` in [-1, 1] (flow B), else None.
        control_pixels: The control images as `[N, 3, H, W]` in [0, 1], else None.
    """

    prompts: list[str]
    negative_prompts: list[str | None]
    reference_prompt: str
    reference_negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    early_guidance_scale: float | None
    early_guidance_steps: int
    layer_names: list[str]
    style_windows: tuple[tuple[int, int], ...] | None
    color_calibration: tuple[float, float] | None
    height: int
    width: int
    generator: torch.Generator | list[torch.Generator] | None
    reference_pixels: torch.Tensor | None
    control_pixels: torch.Tensor | None
    callback_tensor_inputs: list[str]

    @property
    def num_generated(self) -> int:
        return len(self.prompts)


class StylePromptingMixin:
    """The call machinery of the Visual Style Prompting pipelines (not a `DiffusionPipeline`).

    The pipeline provides the components (`unet`, `vae`, `scheduler`, an optional `controlnet`), `image_processor`
    (bicubic, as the reference resizes), `vae_scale_factor`, `_upcast_vae` (SDXL's float16 VAE runs in float32),
    `_callback_tensor_inputs` and `check_model()` (its UNet structure checks).
    """

    _upcast_vae = False

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's downsampling."""
        return size_multiple_of(self.vae_scale_factor, self.unet.config)

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    def check_inputs(
        self,
        prompt,
        reference_prompt,
        reference_image,
        negative_prompt,
        reference_negative_prompt,
        num_images_per_prompt,
        num_inference_steps,
        guidance_scale,
        early_guidance_scale,
        early_guidance_steps,
        style_layers,
        style_steps,
        color_calibration,
        height,
        width,
        generator,
        reference_generator,
        latents,
        reference_latents,
        control_image,
        controlnet_conditioning_scale,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> StyleRequest:
        """Every check of a call, before any model runs; returns the arguments resolved per row."""
        self.check_model()
        num_images_per_prompt = images_per_prompt(num_images_per_prompt, prompt, generator, latents)
        prompts, negatives, reference_negative_prompt = check_prompts(
            prompt, reference_prompt, negative_prompt, reference_negative_prompt, num_images_per_prompt
        )
        num_generated = len(prompts)
        num_inference_steps = check_int(num_inference_steps, "num_inference_steps", 1)
        guidance_scale = check_scale(guidance_scale, "guidance_scale")
        real = reference_image is not None
        if early_guidance_scale is AUTO:
            # Quirk 1 in flow A only: the real-image script turns advanced sampling off, and in the ControlNet
            # scripts it never applies (quirk 10, a shadowed loop index).
            early_guidance_scale = None if real or control_image is not None else EARLY_GUIDANCE_SCALE
        elif early_guidance_scale is not None:
            early_guidance_scale = check_scale(early_guidance_scale, "early_guidance_scale")
        early_guidance_steps = check_int(early_guidance_steps, "early_guidance_steps", 0)
        layer_names = select_style_layers(self.unet, style_layers)
        style_windows = check_style_steps(style_steps)
        color_calibration = check_color_calibration(color_calibration, real)

        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        height, width = check_size(height, width, self.size_multiple)
        latent_shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        for name, value, rows in (("latents", latents, num_generated), ("reference_latents", reference_latents, 1)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch tensor, got {type(value).__name__}.")
            if value is not None and tuple(value.shape) != (rows, *latent_shape):
                raise ValueError(f"`{name}` must have shape {(rows, *latent_shape)}, got {tuple(value.shape)}.")
        generators_per_item(generator, num_generated)
        if reference_generator is not None and not isinstance(reference_generator, torch.Generator):
            raise TypeError(
                f"`reference_generator` must be a torch.Generator, got {type(reference_generator).__name__}."
            )

        reference_pixels = None
        if real:
            images = as_image_list(reference_image, "reference_image")
            if len(images) != 1:
                raise ValueError(f"`reference_image` must be one image, got {len(images)}.")
            reference_pixels = image_to_pixels(images[0], "reference_image", height, width, self.image_processor)
            self.check_reference_sampler(num_inference_steps)
        else:
            self.check_scheduler()
        control_pixels = self.check_control(control_image, controlnet_conditioning_scale, num_generated, height, width)
        check_output_type(output_type)
        tensor_inputs = check_callback(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        return StyleRequest(
            prompts=prompts,
            negative_prompts=negatives,
            reference_prompt=reference_prompt,
            reference_negative_prompt=reference_negative_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            early_guidance_scale=early_guidance_scale,
            early_guidance_steps=early_guidance_steps,
            layer_names=layer_names,
            style_windows=style_windows,
            color_calibration=color_calibration,
            height=height,
            width=width,
            generator=list(generator) if isinstance(generator, (list, tuple)) else generator,
            reference_pixels=reference_pixels,
            control_pixels=control_pixels,
            callback_tensor_inputs=tensor_inputs,
        )

    def check_scheduler(self) -> None:
        """Flow A runs the pipeline's scheduler; it must be one made for SD/SDXL's discrete noise schedule."""
        name = type(self.scheduler).__name__
        if name not in SUPPORTED_SCHEDULERS:
            raise ValueError(
                f"`scheduler` {name} cannot be used by this pipeline; use one of {list(SUPPORTED_SCHEDULERS)}, e.g. "
                "`pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)` (the reference's)."
            )

    def check_reference_sampler(self, num_inference_steps: int) -> None:
        """Flow B runs the authors' forked DDIM from the scheduler config's training schedule."""
        config = self.scheduler.config
        if "num_train_timesteps" not in config or "beta_schedule" not in config:
            raise ValueError(
                f"`scheduler` {type(self.scheduler).__name__} has no discrete training schedule (betas), which the "
                "real-image flow's DDIM needs."
            )
        if config.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"The scheduler's prediction_type {config['prediction_type']!r} is not supported by the real-image "
                "flow; it needs 'epsilon' or 'v_prediction'."
            )
        if num_inference_steps > config["num_train_timesteps"]:
            raise ValueError(
                f"`num_inference_steps` ({num_inference_steps}) must not exceed the scheduler's "
                f"{config['num_train_timesteps']} training timesteps."
            )

    def check_control(self, control_image, scale, num_generated: int, height: int, width: int) -> torch.Tensor | None:
        """The control images as `[N, 3, H, W]` in [0, 1] (one for all generated rows, or one each)."""
        if control_image is None:
            if self.controlnet is not None:
                raise ValueError("`control_image` is required when the pipeline has a `controlnet`.")
            return None
        if self.controlnet is None:
            raise ValueError("`control_image` needs a `controlnet` component (pass `controlnet=` when loading).")
        check_scale(scale, "controlnet_conditioning_scale")
        images = as_image_list(control_image, "control_image")
        if len(images) not in (1, num_generated):
            raise ValueError(f"`control_image` must be one image or {num_generated}, got {len(images)}.")
        pixels = torch.cat(
            [image_to_pixels(im, "control_image", height, width, self.image_processor) for im in images]
        )
        return ((pixels + 1) / 2).expand(num_generated, -1, -1, -1)

    # -----------------------------------------------------------------------------------------------------------------

    def prepare_sampler(self, request: StyleRequest, device) -> SchedulerSampler | ReferenceDDIMSampler:
        """The pipeline's scheduler (flow A), or the authors' forked DDIM built from its config (flow B)."""
        if request.reference_pixels is not None:
            return ReferenceDDIMSampler(self.scheduler.config, request.num_inference_steps, device)
        self.scheduler.set_timesteps(request.num_inference_steps, device=device)
        single = request.generator if isinstance(request.generator, torch.Generator) else None
        return SchedulerSampler(self.scheduler, single)

    def prepare_latents(
        self, request: StyleRequest, latents, reference_latents, reference_generator, init_noise_sigma: float
    ) -> torch.Tensor:
        """Initial latents `[1 + N, C, h, w]` in float32: the reference row, then the generated rows, each drawn as
        diffusers draws (per-row generators or one for all) unless given, times ``init_noise_sigma``."""
        device = self._execution_device
        shape = (
            self.unet.config.in_channels,
            request.height // self.vae_scale_factor,
            request.width // self.vae_scale_factor,
        )
        if request.reference_pixels is not None:
            # Quirk 7: the reference row is replaced before the first UNet call, so it draws nothing (its seed's
            # latent is a dead placeholder in the reference).
            reference_latents = torch.zeros((1, *shape), device=device)
        elif reference_latents is None:
            reference_latents = randn_tensor((1, *shape), generator=reference_generator, device=device)
        if latents is None:
            latents = randn_tensor((request.num_generated, *shape), generator=request.generator, device=device)
        latents = torch.cat([reference_latents.to(device, torch.float32), latents.to(device, torch.float32)])
        return latents * init_noise_sigma

    @contextmanager
    def vae_precision(self):
        """SDXL's VAE overflows in float16 (`force_upcast`): it runs in float32 then, as in diffusers' SDXL."""
        upcast = (
            self._upcast_vae and self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        )
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(torch.float16)

    def reference_image_sampler(self, request: StyleRequest) -> Callable:
        """Encode the real reference once; returns ``draw(generator)``: a fresh posterior sample in latent space.

        The reference encodes the image again every step; the encoder is deterministic, so sampling the cached
        posterior draws the same numbers for a fraction of the cost.
        """
        with self.vae_precision():
            encoded = self.vae.encode(request.reference_pixels.to(self._execution_device, self.vae.dtype))
        posterior = getattr(encoded, "latent_dist", None)

        def draw(generator) -> torch.Tensor:
            sample = posterior.sample(generator) if posterior is not None else encoded.latents
            return self.to_latent_space(sample.float())

        return draw

    def latent_statistics(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE config's per-channel latent mean and std (some SDXL VAEs have them), or None."""
        mean, std = (getattr(self.vae.config, name, None) for name in ("latents_mean", "latents_std"))
        if mean is None or std is None:
            return None
        return tuple(torch.tensor(values, device=device).view(1, -1, 1, 1) for values in (mean, std))

    def to_latent_space(self, sample: torch.Tensor) -> torch.Tensor:
        """A VAE sample as diffusion latents."""
        statistics, scale = self.latent_statistics(sample.device), self.vae.config.scaling_factor
        return sample * scale if statistics is None else (sample - statistics[0]) * scale / statistics[1]

    def decode_rows(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] decoded one row at a time (quirk 11: the reference's VAE slicing)."""
        statistics, scale = self.latent_statistics(latents.device), self.vae.config.scaling_factor
        latents = latents / scale if statistics is None else latents * statistics[1] / scale + statistics[0]
        with self.vae_precision():
            rows = [self.vae.decode(row[None].to(self.vae.dtype), return_dict=False)[0] for row in latents]
        return torch.cat(rows).float()

    def unet_output(self, sample, t, conditioning: dict, groups: RowGroups, control: torch.Tensor | None, scale):
        """The UNet's output for the step's rows, in float32; with a ControlNet, its residuals for the generated
        rows (quirk 10: the reference rows get none, so the reference is made without the control image)."""
        dtype = self.unet.dtype
        embeddings = conditioning["prompt_embeds"].to(dtype)
        added = None
        if "add_text_embeds" in conditioning:
            added = {
                "text_embeds": conditioning["add_text_embeds"].to(dtype),
                "time_ids": conditioning["add_time_ids"].to(dtype),
            }
        residuals = {}
        if control is not None:
            generated = [name for name in groups.names if name.endswith("/generated")]
            rows = torch.cat([torch.arange(groups.total)[groups.rows(name)] for name in generated]).to(sample.device)
            down, mid = self.controlnet(
                sample[rows].to(self.controlnet.dtype),
                t,
                encoder_hidden_states=embeddings[rows].to(self.controlnet.dtype),
                controlnet_cond=torch.cat([control] * len(generated)).to(sample.device, self.controlnet.dtype),
                conditioning_scale=scale,
                added_cond_kwargs=None if added is None else {k: v[rows] for k, v in added.items()},
                return_dict=False,
            )

            def with_reference_zeros(residual: torch.Tensor) -> torch.Tensor:
                residual = residual.to(dtype)
                parts = dict(zip(generated, residual.chunk(len(generated))))
                zeros = residual.new_zeros(1, *residual.shape[1:])
                return groups.stack({name: parts.get(name, zeros) for name in groups.names})

            residuals = {
                "down_block_additional_residuals": [with_reference_zeros(r) for r in down],
                "mid_block_additional_residual": with_reference_zeros(mid),
            }
        return self.unet(
            sample.to(dtype),
            t,
            encoder_hidden_states=embeddings,
            added_cond_kwargs=added,
            **residuals,
            return_dict=False,
        )[0].float()

    def denoise(
        self,
        request: StyleRequest,
        latents: torch.Tensor,
        sampler,
        plan: list[StyleStep],
        conditioning: dict[str, torch.Tensor],
        draw_reference: Callable | None,
        reference_generator,
        controlnet_conditioning_scale: float,
        callback_on_step_end,
    ) -> torch.Tensor:
        """The denoising loop: per step re-noise the real reference (flow B), one UNet call with the style edits,
        guidance, the sampler's step, the callback. ``conditioning`` holds the full guided batch's tensors."""
        num_generated = request.num_generated
        full = style_row_groups(num_generated, guided=True)
        controller = AttentionController()
        with controlled_attention(self.unet, controller, request.layer_names, self._execution_device):
            with self.progress_bar(total=len(plan)) as progress_bar:
                for i, (t, step) in enumerate(zip(sampler.timesteps, plan)):
                    if self.interrupt:
                        continue
                    if draw_reference is not None:
                        latents = renoise_reference(latents, t, draw_reference, sampler, reference_generator)
                    groups = style_row_groups(num_generated, guided=step.guidance_scale is not None)
                    controller.begin_step(groups, style_edits(request.layer_names, groups) if step.swap else {})
                    sample = sampler.scale_model_input(torch.cat([latents] * (len(groups.names) // 2)), t)
                    step_conditioning = {
                        name: select_rows(value, full, groups) for name, value in conditioning.items()
                    }
                    noise = self.unet_output(
                        sample, t, step_conditioning, groups, request.control_pixels, controlnet_conditioning_scale
                    )
                    eps = guide(noise, groups, step.guidance_scale)
                    if draw_reference is not None:
                        # Quirk 2 (flow B, `use_prompt_as_null`): the reference row takes its conditional prediction.
                        eps[:1] = noise[groups.rows("cond/reference")]
                    latents = sampler.step(eps, t, latents, step)

                    if callback_on_step_end is not None:
                        tensors = {"latents": latents, **conditioning}
                        kwargs = {name: tensors[name] for name in request.callback_tensor_inputs}
                        outputs = callback_on_step_end(self, i, t, kwargs) or {}
                        latents = outputs.pop("latents", latents)
                        conditioning = {name: outputs.get(name, value) for name, value in conditioning.items()}
                    progress_bar.update()
        return latents
