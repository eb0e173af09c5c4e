"""Free-Prompt-Editing (Liu et al., "Towards Understanding Cross and Self-Attention in Stable Diffusion for
Text-Guided Image Editing", CVPR 2024, arXiv 2403.03431) for diffusers.

An image is edited by its prompt ("a photo of a cat" -> "a photo of a tiger") with no training and no mask:

1. a real image is DDIM-inverted with its source prompt; a generated image starts from noise;
2. a source branch and a target branch (one per target prompt) are denoised together with classifier-free guidance;
   a real image's source is teacher-forced along its inversion, a generated image's source runs freely;
3. during the first steps (80 % by default), in every self-attention layer with at most 32x32 query tokens, the
   target's conditional rows use the source's attention probabilities on their own values, so the target keeps the
   image's layout while its prompt changes the content.

With default arguments the pipeline reproduces the authors' code (``shared/REFERENCE-FPE.md``) number for number; its
quirks are named where they are reproduced. Work that cannot change the result is skipped ([`plan_edit_steps`]).
"""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

from .attention_control import AttentionController, AttentionMapInjection, RowGroups
from .attention_processors import controlled_attention, list_attention_layers
from .ddim_inversion import (
    NULL_TEXT_EARLY_STOP,
    NULL_TEXT_INNER_STEPS,
    DDIMInversionResult,
    ddim_invert,
    ddim_update,
    denoising_alphas,
    optimise_null_text,
    step_stride,
)
from .inputs import (
    as_image_list,
    check_callback,
    check_int,
    check_output_type,
    check_scale,
    check_size,
    generators_per_item,
    image_to_pixels,
)
from .sd_glue import SDGlueMixin, vae_scale_factor_of

__all__ = ["DDIMInversionResult", "FreePromptEditingPipeline", "FreePromptEditingPipelineOutput"]

DEFAULT_SIZE = 512  # the reference edits at 512 x 512 (64 x 64 latents)
RESIZE_MODES = ("crop", "stretch")


@dataclass
class FreePromptEditingPipelineOutput(BaseOutput):
    """Output of [`FreePromptEditingPipeline`].

    Args:
        images: The edits, one per target prompt (PIL images, a numpy array, a tensor, or latents).
        source_images: The source branch decoded (the reconstruction, or the generated source image), with
            `return_source=True`.
        inversion (`DDIMInversionResult`): The real image's inversion (given or computed); None for a generated image.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    source_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None
    inversion: DDIMInversionResult | None = None


# ------------------------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------------------------


def replace_window(num_steps: int, self_replace_steps) -> range:
    """The loop steps whose target takes the source's attention maps: ``int(T * f0) <= i < int(T * f1)``.

    As the reference's controller: a number ``f`` means ``(0, f)``, a pair ``(f0, f1)`` is used as is, the products
    are truncated toward zero, the start is inclusive and the end exclusive (T=50, 0.8: steps 0..39; T=12, 0.8: 0..8).

    Args:
        num_steps: The denoising steps `T`.
        self_replace_steps: A fraction in [0, 1], or a ``(start, end)`` pair of fractions.
    """
    if isinstance(self_replace_steps, (tuple, list)):
        if len(self_replace_steps) != 2:
            raise TypeError(
                f"`self_replace_steps` must be a fraction or a (start, end) pair, got {self_replace_steps}."
            )
        start, end = (check_scale(value, "self_replace_steps") for value in self_replace_steps)
    else:
        start, end = 0.0, check_scale(self_replace_steps, "self_replace_steps")
    if not start <= end <= 1:
        raise ValueError(
            f"`self_replace_steps` must be fractions with 0 <= start <= end <= 1, got {self_replace_steps}."
        )
    return range(int(num_steps * start), int(num_steps * end))


@dataclass(frozen=True)
class EditStep:
    """What one denoising step computes.

    Args:
        replace_maps: The target's conditional rows use the source's attention maps in the replaced layers.
        source_rows: The source's row groups in this step's UNet call: none, ``"cond/source"``, or both.
        update_source: The source's guided noise is used: its DDIM update is kept.
        guided: Classifier-free guidance, i.e. the unconditional rows run.
    """

    replace_maps: bool
    source_rows: tuple[str, ...]
    update_source: bool
    guided: bool

    def row_groups(self, num_targets: int) -> RowGroups:
        """The rows of this step's UNet call, in the reference's order ``[u_src, u_tgt, c_src, c_tgt]``."""
        groups = [("uncond/source", 1)] if "uncond/source" in self.source_rows else []
        groups += [("uncond/target", num_targets)] if self.guided else []
        groups += [("cond/source", 1)] if "cond/source" in self.source_rows else []
        return RowGroups.of(*groups, ("cond/target", num_targets))


def plan_edit_steps(
    num_steps: int,
    window: range,
    *,
    teacher_forced: bool,
    keep_source: bool,
    source_every_step: bool,
    guided: bool,
    source_rows_identical: bool,
) -> list[EditStep]:
    """The steps of one edit, with only the rows that can change its result.

    - The source's conditional row runs where the target takes its maps (the window) or the source is updated.
    - A teacher-forced source (real image) is reset to the inversion at every step, so its own update matters only at
      the last step with `return_source`; a free source (generated image) is updated until the last step of the
      window, or to the end with `return_source`. A step callback sees the source after every step.
    - The source's unconditional row runs only for its update, and not when it is the same input as the conditional
      row (the same latent with the same embedding: an empty source prompt), where guidance is the identity.

    Args:
        num_steps: The denoising steps `T`.
        window: The steps that replace maps ([`replace_window`]).
        teacher_forced: The source follows an inversion (real image) rather than its own updates.
        keep_source: The final source latent is returned.
        source_every_step: The source latent is needed after every step (a step callback sees it).
        guided: Classifier-free guidance (``guidance_scale > 1``).
        source_rows_identical: The source's unconditional and conditional embeddings are equal.
    """
    plan = []
    for i in range(num_steps):
        if source_every_step:
            update_source = True
        elif teacher_forced:
            update_source = keep_source and i == num_steps - 1
        else:
            update_source = keep_source or (len(window) > 0 and i < window.stop - 1)
        replace_maps = i in window
        if update_source and guided and not source_rows_identical:
            source_rows = ("uncond/source", "cond/source")
        elif update_source or replace_maps:
            source_rows = ("cond/source",)
        else:
            source_rows = ()
        plan.append(EditStep(replace_maps, source_rows, update_source, guided))
    return plan


def ddim_scheduler_for_editing(scheduler) -> DDIMScheduler:
    """The scheduler as the `DDIMScheduler` the method needs, with ``steps_offset = 1``.

    Other schedulers (SD 1.5 ships PNDM) are converted from their config. Quirk, reproduced: the reference builds its
    DDIM scheduler with ``steps_offset=0`` and `StableDiffusionPipeline.__init__` rewrites it to 1, which gives its
    timesteps (T=50: 981, 961, ..., 1); this pipeline does the same, on a copy.

    Args:
        scheduler: Any diffusers scheduler of the model.
    """
    if isinstance(scheduler, DDIMScheduler) and scheduler.config.steps_offset == 1:
        return scheduler
    return DDIMScheduler.from_config(scheduler.config, steps_offset=1)


@dataclass(frozen=True)
class EditInputs:
    """The arguments of one [`FreePromptEditingPipeline.__call__`], checked and brought to their working form."""

    prompts: list[str]
    pixels: torch.Tensor | None
    inversion: DDIMInversionResult | None
    latents: torch.Tensor | None
    height: int
    width: int
    window: range
    callback_tensor_inputs: list[str]


# ------------------------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------------------------


class FreePromptEditingPipeline(SDGlueMixin, DiffusionPipeline):
    r"""Text-guided editing of real and generated images with Free-Prompt-Editing, on Stable Diffusion 1.x/2.x.

    This model inherits from [`DiffusionPipeline`]; see the superclass documentation for the generic methods
    (downloading, saving, running on a device, offloading).

    Args:
        vae ([`AutoencoderKL`]): Variational autoencoder (any diffusers VAE class).
        text_encoder ([`~transformers.CLIPTextModel`]): Frozen text encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]): Tokenizer of the text encoder.
        unet ([`UNet2DConditionModel`]): The denoising UNet (epsilon or v prediction).
        scheduler ([`SchedulerMixin`]): Any scheduler config of the model; it becomes a [`DDIMScheduler`] with
            ``steps_offset=1`` (see [`ddim_scheduler_for_editing`]).
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
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=ddim_scheduler_for_editing(scheduler),
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = vae_scale_factor_of(vae)
        # Centre crop + Pillow's bicubic resize, as the project's other pipelines (the reference stretches with
        # nearest-neighbour: `resize_mode="stretch"`).
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self._guidance_scale = 7.5
        self._num_timesteps = 0
        self._interrupt = False

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------------------------------------------------

    def set_editing_timesteps(self, num_inference_steps) -> int:
        """Check the step count and the scheduler, then set its timesteps: the hand-written DDIM updates need a
        `DDIMScheduler` whose timesteps are ``1000 // T`` apart ("leading" spacing, the reference, or "trailing").

        Args:
            num_inference_steps: The DDIM steps `T`.

        Returns:
            `T` as an int.
        """
        num_inference_steps = check_int(num_inference_steps, "num_inference_steps", 1)
        if not isinstance(self.scheduler, DDIMScheduler):
            raise ValueError(
                f"`scheduler` is a {type(self.scheduler).__name__}; Free-Prompt-Editing's DDIM inversion and updates "
                "need a DDIMScheduler: set `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`."
            )
        self.check_prediction_type()
        if num_inference_steps > self.scheduler.config.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps` must be at most {self.scheduler.config.num_train_timesteps} (the scheduler's "
                f"training steps), got {num_inference_steps}."
            )
        self.scheduler.set_timesteps(num_inference_steps)
        gaps = set((self.scheduler.timesteps[:-1] - self.scheduler.timesteps[1:]).tolist())
        if gaps - {step_stride(self.scheduler)}:
            raise ValueError(
                f"The scheduler's timestep_spacing {self.scheduler.config.timestep_spacing!r} gives timesteps that "
                f"are not {step_stride(self.scheduler)} apart for num_inference_steps={num_inference_steps}; use "
                "'leading' (as the reference) or 'trailing' with a step count that divides "
                f"{self.scheduler.config.num_train_timesteps}."
            )
        return num_inference_steps

    def preprocess_image(self, image, name: str, height: int, width: int, resize_mode: str) -> torch.Tensor:
        """One image to `[1, 3, height, width]` float32 in [-1, 1].

        ``"crop"``: centre crop to the target aspect, then Pillow bicubic resize (the project's preprocessing).
        ``"stretch"``: the reference's: the whole image, nearest-neighbour resize, aspect ratio not kept.
        A float tensor or array with negative values is taken as already normalised to [-1, 1], as diffusers' image
        processor does.

        Args:
            image: A PIL image (RGB), a `[H, W, 3]` array (uint8 or float) or a `[3, H, W]` float tensor.
            name: The argument's name, for errors.
            height, width: The size in pixels.
            resize_mode: ``"crop"`` or ``"stretch"``.
        """
        floating = (isinstance(image, torch.Tensor) and image.is_floating_point()) or (
            isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating)
        )
        if floating and image.min() < 0:
            image = (image + 1) / 2  # exact for images that came from uint8
        if resize_mode == "crop":
            return image_to_pixels(image, name, height, width, self.image_processor)
        if isinstance(image, PIL.Image.Image):
            if image.mode != "RGB":
                raise ValueError(
                    f"`{name}` must be an RGB image, got mode {image.mode!r}; use `image.convert('RGB')`."
                )
            image = np.asarray(image)
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.array(image))
            image = image.permute(2, 0, 1) if image.ndim == 3 else image
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or image.numel() == 0:
            raise ValueError(f"`{name}` must be an RGB image: PIL, [H, W, 3] array or [3, H, W] tensor.")
        if image.dtype == torch.uint8:
            pixels = image.float() / 127.5 - 1  # the reference's mapping of the decoded file
        elif image.is_floating_point() and torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1:
            pixels = image.float() * 2 - 1
        else:
            raise ValueError(f"`{name}` must be uint8, or float with values in [0, 1].")
        return F.interpolate(pixels[None].cpu(), size=(height, width))  # PyTorch's default mode: nearest

    def _check_inversion(self, inversion, source_prompt, inversion_guidance_scale, negative_prompt) -> None:
        """Refuse an inversion that does not fit this call (its shapes, timesteps and recorded settings)."""
        if inversion.batch_size != 1:
            raise ValueError(
                f"`inversion` holds {inversion.batch_size} images; an edit takes one: pass `inversion.select([i])`."
            )
        if not torch.equal(inversion.timesteps.cpu().long(), self.scheduler.timesteps.long()):
            raise ValueError(
                f"`inversion` has the timesteps {inversion.timesteps.tolist()} but num_inference_steps="
                f"{len(self.scheduler.timesteps)} gives {self.scheduler.timesteps.tolist()}; invert with the same "
                "steps."
            )
        if inversion.latents.shape[2] != self.unet.config.in_channels:
            raise ValueError(
                f"`inversion` latents have {inversion.latents.shape[2]} channels, the UNet takes "
                f"{self.unet.config.in_channels}."
            )
        # The reference inverts with the edit's source prompt; another prompt silently degrades the edit.
        if inversion.prompt is not None and inversion.prompt != source_prompt:
            raise ValueError(
                f"`inversion` was made with prompt={inversion.prompt!r} but `source_prompt` is {source_prompt!r}; "
                "pass the inversion's prompt as `source_prompt`."
            )
        if None not in (inversion.guidance_scale, inversion_guidance_scale):
            if inversion.guidance_scale != inversion_guidance_scale:
                raise ValueError(
                    f"`inversion` was made with guidance_scale={inversion.guidance_scale} but "
                    f"`inversion_guidance_scale` is {inversion_guidance_scale}."
                )
        embeddings = inversion.null_text_embeddings
        if embeddings is not None:
            expected = (self.tokenizer.model_max_length, self.text_encoder.config.hidden_size)
            if tuple(embeddings.shape[2:]) != expected:
                raise ValueError(
                    f"`inversion` null-text embeddings are {tuple(embeddings.shape[2:])}, the text "
                    f"encoder gives {expected}."
                )
            if negative_prompt is not None:
                raise ValueError("`negative_prompt` cannot be used with null-text embeddings, which replace it.")

    def _size_of(self, latents: torch.Tensor, name: str, height, width) -> tuple[int, int]:
        """The pixel size that ``latents`` imply; given sizes must agree."""
        implied = (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        for side, value, expected in (("height", height, implied[0]), ("width", width, implied[1])):
            if value is not None and value != expected:
                raise ValueError(f"`{side}` is {value} but `{name}` has latents for {implied[0]}x{implied[1]} images.")
        return implied

    def check_inputs(
        self,
        prompt,
        image,
        source_prompt,
        inversion,
        num_inference_steps,
        guidance_scale,
        inversion_guidance_scale,
        self_replace_steps,
        self_replace_max_tokens,
        negative_prompt,
        height,
        width,
        generator,
        latents,
        output_type,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        resize_mode,
    ) -> EditInputs:
        """Every check of [`__call__`], before any model runs; sets the scheduler's timesteps."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        if not isinstance(source_prompt, str):
            raise TypeError(f"`source_prompt` must be a string, got {type(source_prompt).__name__}.")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise TypeError(f"`negative_prompt` must be a string or None, got {type(negative_prompt).__name__}.")
        num_inference_steps = self.set_editing_timesteps(num_inference_steps)
        check_scale(guidance_scale, "guidance_scale")
        if inversion_guidance_scale is not None:
            check_scale(inversion_guidance_scale, "inversion_guidance_scale")
        window = replace_window(num_inference_steps, self_replace_steps)
        check_int(self_replace_max_tokens, "self_replace_max_tokens", 0)
        check_output_type(output_type)
        tensor_inputs = check_callback(
            callback_on_step_end, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs
        )
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}.")
        generators_per_item(generator, 1)

        images = as_image_list(image, "image")
        if images is not None and len(images) != 1:
            raise ValueError(f"`image` holds {len(images)} images; an edit takes one (pass several prompts instead).")
        if images is not None and inversion is not None:
            raise ValueError("Pass `image` or `inversion`, not both.")
        if latents is not None and (images is not None or inversion is not None):
            raise ValueError("`latents` starts a generated image; it cannot be combined with `image` or `inversion`.")
        if inversion is not None:
            inversion = DDIMInversionResult.coerce(inversion, "inversion")
            self._check_inversion(inversion, source_prompt, inversion_guidance_scale, negative_prompt)
            height, width = self._size_of(inversion.latents, "inversion", height, width)
        elif latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"`latents` must be a torch.Tensor, got {type(latents).__name__}.")
            latents = latents[None] if latents.ndim == 3 else latents
            rows, channels = (1, 1 + len(prompts)), self.unet.config.in_channels
            if latents.ndim != 4 or latents.shape[0] not in rows or latents.shape[1] != channels:
                raise ValueError(
                    f"`latents` must be [1, {channels}, h, w] (shared) or [{rows[1]}, {channels}, h, w] (source, "
                    f"then each target), got {tuple(latents.shape)}."
                )
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` holds non-finite values.")
            height, width = self._size_of(latents, "latents", height, width)
        height = DEFAULT_SIZE if height is None else height
        width = DEFAULT_SIZE if width is None else width
        height, width = check_size(height, width, self.size_multiple)
        pixels = self.preprocess_image(images[0], "image", height, width, resize_mode) if images else None
        return EditInputs(prompts, pixels, inversion, latents, height, width, window, tensor_inputs)

    # ------------------------------------------------------------------------------------------------------------
    # Inversion
    # ------------------------------------------------------------------------------------------------------------

    def _inversion_noise(self, uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, batch_size: int):
        """``(latents, timestep) -> noise`` of the inversion: the reference's one call on ``[x, x]`` with
        ``[uncond, cond]``, guided."""
        uncond, cond = uncond.expand(batch_size, -1, -1), cond.expand(batch_size, -1, -1)
        if guidance_scale <= 1 or torch.equal(uncond, cond):
            # Unguided, the reference runs the conditional rows alone. With an empty prompt the two rows are the
            # same input and guidance is the identity (the reference's rows come out equal): one row suffices.
            return lambda latents, timestep: self.predict_noise(latents, timestep, cond)

        def guided(latents: torch.Tensor, timestep) -> torch.Tensor:
            rows = self.predict_noise(torch.cat([latents, latents]), timestep, torch.cat([uncond, cond]))
            noise_uncond, noise_cond = rows.chunk(2)
            return noise_uncond + guidance_scale * (noise_cond - noise_uncond)

        return guided

    def _invert_pixels(self, pixels, prompt, guidance_scale, height, width, null_text=None) -> DDIMInversionResult:
        """DDIM inversion of preprocessed images (the scheduler's timesteps are set); ``null_text`` holds the
        optimisation's ``(inner_steps, early_stop)``."""
        device = self._execution_device
        uncond, cond = self.encode_text(["", prompt], device).chunk(2)
        clean_latents = self.encode_images(pixels)
        num_steps, batch_size = len(self.scheduler.timesteps), clean_latents.shape[0]
        # Null-text inversion inverts with the prompt alone (prompt-to-prompt's `ddim_loop`) and optimises the
        # unconditional embeddings for the guidance scale.
        predict = self._inversion_noise(uncond, cond, 1.0 if null_text else guidance_scale, batch_size)
        with self.progress_bar(total=num_steps) as progress_bar:
            trajectory = ddim_invert(clean_latents, self.scheduler, predict, progress_bar.update)
        null_text_embeddings = None
        if null_text:
            with self.progress_bar(total=num_steps * batch_size) as progress_bar:
                null_text_embeddings = torch.stack(
                    [
                        optimise_null_text(
                            trajectory[b : b + 1],
                            self.scheduler,
                            uncond,
                            cond,
                            self.predict_noise,
                            guidance_scale,
                            *null_text,
                            on_step=progress_bar.update,
                        )
                        for b in range(batch_size)
                    ]
                )
        return DDIMInversionResult(
            trajectory,
            self.scheduler.timesteps.clone(),
            prompt=prompt,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            null_text_embeddings=null_text_embeddings,
        )

    @torch.no_grad()
    def invert(
        self,
        image,
        prompt: str = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int = DEFAULT_SIZE,
        width: int = DEFAULT_SIZE,
        *,
        resize_mode: str = "crop",
        null_text: bool = False,
        null_text_inner_steps: int = NULL_TEXT_INNER_STEPS,
        null_text_early_stop: float = NULL_TEXT_EARLY_STOP,
    ) -> DDIMInversionResult:
        r"""DDIM-invert real images, for one or many edits with ``pipe(..., inversion=result)``.

        Args:
            image: A PIL image (RGB), a numpy array (`[H, W, 3]`, uint8 or float in [0, 1]), a tensor (`[3, H, W]`
                float in [0, 1], or in [-1, 1] when it has negative values), or a list of them.
            prompt: The source prompt, which the edits must use as `source_prompt` (the reference's default: "").
            num_inference_steps: Length `T` of the DDIM schedule; the edits use the same.
            guidance_scale: Classifier-free guidance scale of the inversion (the reference: the edit's, 7.5). With
                `null_text=True` the inversion is unguided and this is the scale the embeddings are optimised for.
            height, width: Image size in pixels, multiples of 64 for SD.
            resize_mode: ``"crop"`` (centre crop + bicubic resize) or ``"stretch"`` (the reference's nearest-neighbour
                stretch of the whole image).
            null_text: Null-text inversion (the authors' third notebook): optimise one unconditional embedding per
                step so that guided steps retrace the inversion; for images that DDIM inversion reconstructs poorly.
            null_text_inner_steps: Most Adam steps per denoising step (10).
            null_text_early_stop: A step's optimisation stops once its loss is below this `+ i * 2e-5` (1e-5).

        Returns:
            [`DDIMInversionResult`] with the trajectories `[B, T+1, 4, h, w]` and the settings.
        """
        images = as_image_list(image, "image")
        if images is None:
            raise ValueError("`image` is required.")
        if not isinstance(prompt, str):
            raise TypeError(f"`prompt` must be a string, got {type(prompt).__name__}.")
        self.set_editing_timesteps(num_inference_steps)
        guidance_scale = check_scale(guidance_scale, "guidance_scale")
        height, width = check_size(height, width, self.size_multiple)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}.")
        if not isinstance(null_text, bool):
            raise TypeError(f"`null_text` must be True or False, got {null_text!r}.")
        null_text_settings = None
        if null_text:
            inner_steps = check_int(null_text_inner_steps, "null_text_inner_steps", 1)
            null_text_settings = (inner_steps, check_scale(null_text_early_stop, "null_text_early_stop"))
        pixels = torch.cat([self.preprocess_image(i, "image", height, width, resize_mode) for i in images])
        inversion = self._invert_pixels(pixels, prompt, guidance_scale, height, width, null_text_settings)
        self.maybe_free_model_hooks()
        return inversion

    # ------------------------------------------------------------------------------------------------------------
    # Editing
    # ------------------------------------------------------------------------------------------------------------

    def replaced_layers(self, height: int, width: int, max_tokens: int) -> list[str]:
        """The self-attention layers whose maps the target takes: at most ``max_tokens`` query tokens at this size.

        The reference's rule (``Nq <= res * res``) by absolute token count, in down, mid and up blocks alike: at
        512 px every level but the 64x64 one for ``max_tokens=1024``; the selection moves with the image size.

        Args:
            height, width: The image size in pixels.
            max_tokens: The most query tokens of a replaced layer (the reference's ``res * res``).
        """
        latent_height, latent_width = height // self.vae_scale_factor, width // self.vae_scale_factor
        return [
            layer.name
            for layer in list_attention_layers(self.unet)
            if layer.is_self_attention and layer.query_tokens(latent_height, latent_width) <= max_tokens
        ]

    def _guided_noise(self, step: EditStep, groups: RowGroups, latents: dict, embeddings: dict, timestep) -> dict:
        """One UNet call on the step's rows, then classifier-free guidance per branch that the step updates."""
        noise = groups.split(self.predict_noise(groups.stack(latents), timestep, groups.stack(embeddings)))
        guided = {}
        for branch in ("target", "source") if step.update_source else ("target",):
            cond, uncond = noise[f"cond/{branch}"], noise.get(f"uncond/{branch}")
            # Without its unconditional row a branch is unguided (guidance_scale <= 1), or its two rows would be the
            # same input, where guidance is the identity.
            guided[branch] = cond if uncond is None else uncond + self.guidance_scale * (cond - uncond)
        return guided

    def _decode(self, latents: torch.Tensor, output_type: str, dtype: torch.dtype):
        """Decode to ``output_type``, blacking out what the safety checker flags (``"latent"`` returns them)."""
        if output_type == "latent":
            return latents
        # Quirk (section 7): the reference multiplies by the reciprocal of the scaling factor rather than dividing.
        scaled = (1 / self.vae.config.scaling_factor) * latents.to(self.vae.dtype)
        images = self.vae.decode(scaled, return_dict=False)[0]
        images = self.run_safety_checker(images, self._execution_device, dtype)
        if output_type != "pil":
            return self.image_processor.postprocess(images, output_type=output_type)
        # Quirk: the reference saves with torchvision's `save_image`, which rounds as floor(255 x + 0.5).
        pixels = (images.float() / 2 + 0.5).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
        return [PIL.Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image=None,
        *,
        source_prompt: str = "",
        inversion: DDIMInversionResult | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        inversion_guidance_scale: float | None = None,
        self_replace_steps: float | tuple[float, float] = 0.8,
        self_replace_max_tokens: int = 1024,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_source: bool = False,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        resize_mode: str = "crop",
    ):
        r"""Edit an image by its prompt.

        With `image` (or an `inversion` of it) a real image is edited; with neither, a generated image of
        `source_prompt` is drawn from `latents` / `generator` and edited.

        Args:
            prompt: The target prompt, or a list of them (several edits of one image in one batch, sharing the
                source's rows).
            image: The real image: a PIL image (RGB), a numpy array (`[H, W, 3]` uint8 or float in [0, 1]) or a
                tensor (`[3, H, W]` float in [0, 1], or in [-1, 1] when it has negative values).
            source_prompt: The prompt of the source branch and of the inversion (real images: "" as the reference).
            inversion: A [`DDIMInversionResult`] of the image from [`~FreePromptEditingPipeline.invert`] (or any with
                `latents` and `timesteps`), used instead of `image`.
            num_inference_steps: `T`, the DDIM steps of inversion and editing.
            guidance_scale: Classifier-free guidance scale of the edit (no unconditional rows when <= 1).
            inversion_guidance_scale: Guidance scale of the inversion; defaults to `guidance_scale`.
            self_replace_steps: A fraction `f` (the target takes the source's self-attention maps at the steps
                `0 <= i < int(T * f)`) or a pair `(f0, f1)` (steps `int(T * f0) <= i < int(T * f1)`).
            self_replace_max_tokens: The self-attention layers with at most this many query tokens at the call's
                size are replaced (the reference's `res = 32`: 1024, at 512 px every level but the highest).
            negative_prompt: The unconditional text of the edit (the inversion keeps ""); default "".
            height, width: Image size in pixels; default 512, or the size of `inversion` / `latents`.
            generator: Draws the start latent of a generated image.
            latents: The start of a generated image: `[1, 4, h, w]` for every branch (the reference), or
                `[1 + K, 4, h, w]` for the source and each target.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_source: Also decode the source branch (`source_images`).
            return_dict: Return a [`FreePromptEditingPipelineOutput`] instead of a tuple.
            callback_on_step_end: Called as `callback(pipe, step, timestep, callback_kwargs)` after every step;
                `callback_kwargs["latents"]` is the batch `[source, target 1, ..., target K]` (as the reference's
                loop), and a returned `"latents"` replaces it. With a callback the source is computed at every step;
                a real image's source is reset to its inversion at the next step anyway, as in the reference.
            callback_on_step_end_tensor_inputs: The tensors passed to the callback.
            resize_mode: ``"crop"`` (centre crop + bicubic) or ``"stretch"`` (the reference's nearest stretch).

        Examples:
            ```py
            >>> pipe = DiffusionPipeline.from_pretrained(
            ...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
            ...     custom_pipeline="<repo>/pipeline_prompt_editing.py",
            ...     trust_remote_code=True,
            ... ).to("cuda")
            >>> pipe("a photo of a tiger", load_image("cat.png"), source_prompt="a photo of a cat").images[0]
            ```

        Returns:
            [`FreePromptEditingPipelineOutput`], or the tuple `(images, source_images, inversion)`.
        """
        # 1. Check the inputs, before any model runs
        call = self.check_inputs(
            prompt,
            image,
            source_prompt,
            inversion,
            num_inference_steps,
            guidance_scale,
            inversion_guidance_scale,
            self_replace_steps,
            self_replace_max_tokens,
            negative_prompt,
            height,
            width,
            generator,
            latents,
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            resize_mode,
        )
        device, num_targets = self._execution_device, len(call.prompts)
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, num_inference_steps, False
        timesteps = self.scheduler.timesteps

        # 2. A real image is inverted with the source prompt (or its inversion is given) and its source branch is
        #    teacher-forced along the trajectory; a generated image's branches start from the same noise.
        inversion = call.inversion
        if call.pixels is not None:
            inversion_scale = guidance_scale if inversion_guidance_scale is None else inversion_guidance_scale
            inversion = self._invert_pixels(call.pixels, source_prompt, inversion_scale, call.height, call.width)
        if inversion is not None:
            trajectory = inversion.latents.to(device=device, dtype=torch.float32)
            start = trajectory[:, num_inference_steps]
        elif call.latents is not None:
            start = call.latents.to(device=device, dtype=torch.float32)
        else:
            latent_shape = (
                1,
                self.unet.config.in_channels,
                *(s // self.vae_scale_factor for s in (call.height, call.width)),
            )
            start = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)

        # 3. Encode the text: the unconditional text (negative prompt or ""), the source and the targets
        embeds = self.encode_text([negative_prompt or "", source_prompt, *call.prompts], device)
        uncond, source_embeds, target_embeds = embeds[:1], embeds[1:2], embeds[2:]
        null_text = inversion.null_text_embeddings if inversion is not None else None

        # 4. Plan: which steps replace maps, in which layers, and which rows each step's UNet call needs
        plan = plan_edit_steps(
            num_inference_steps,
            call.window,
            teacher_forced=inversion is not None,
            keep_source=return_source,
            source_every_step=callback_on_step_end is not None,
            guided=self.do_classifier_free_guidance,
            source_rows_identical=null_text is None and torch.equal(uncond, source_embeds),
        )
        layers = self.replaced_layers(call.height, call.width, self_replace_max_tokens)
        # The target's conditional rows take the source's maps: A_src V_tgt = sdpa(Q_src, K_src, V_tgt); the
        # unconditional rows keep their own (the reference edits the conditional half only).
        map_injection = {
            name: [AttentionMapInjection(receiver="cond/target", source="cond/source")] for name in layers
        }
        controller = AttentionController()

        # 5. Denoise both branches: one UNet call per step on the rows the plan names
        source, target = start.expand(1 + num_targets, -1, -1, -1).split([1, num_targets])
        with controlled_attention(self.unet, controller, layers, device), self.progress_bar(total=len(plan)) as bar:
            for i, (t, step) in enumerate(zip(timesteps, plan)):
                if self.interrupt:
                    continue
                if inversion is not None:  # teacher forcing: the source restarts from the inversion at every step
                    source = trajectory[:, num_inference_steps - i]
                if null_text is not None:
                    uncond = null_text[:, i].to(device=device, dtype=embeds.dtype)
                groups = step.row_groups(num_targets)
                controller.begin_step(groups, map_injection if step.replace_maps else {})
                noise = self._guided_noise(
                    step,
                    groups,
                    {"uncond/source": source, "uncond/target": target, "cond/source": source, "cond/target": target},
                    {
                        "uncond/source": uncond,
                        "uncond/target": uncond,
                        "cond/source": source_embeds,
                        "cond/target": target_embeds,
                    },
                    t,
                )
                alphas = denoising_alphas(self.scheduler, t)
                target = ddim_update(target, noise["target"], *alphas)
                if step.update_source:
                    source = ddim_update(source, noise["source"], *alphas)
                if callback_on_step_end is not None:
                    state = {"latents": torch.cat([source, target])}
                    outputs = callback_on_step_end(self, i, t, {k: state[k] for k in call.callback_tensor_inputs})
                    source, target = outputs.pop("latents", state["latents"]).split([1, num_targets])
                bar.update()
        if not torch.isfinite(target).all():
            raise RuntimeError("The edit diverged to non-finite latents (in float16, try float32).")

        # 6. Decode the targets (and the source)
        decoded = self._decode(torch.cat([source, target]) if return_source else target, output_type, embeds.dtype)
        images, source_images = (decoded[1:], decoded[:1]) if return_source else (decoded, None)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, source_images, inversion
        return FreePromptEditingPipelineOutput(images=images, source_images=source_images, inversion=inversion)
