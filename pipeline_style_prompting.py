"""Visual Style Prompting with Swapping Self-Attention (Jeong et al., arXiv 2402.12974) on Stable Diffusion 1.x/2.x.

The authors released the method for SDXL only (their issue #12 on SD 1.5: "no plans"). This port keeps every rule
of their SDXL code (``style_prompting.py``) and maps what SDXL-specific: the style layers are the decoder's
highest-resolution attention level (SD 1.5: the 3 self-attention layers of ``up_blocks.3``, 64x64 tokens at 512 px,
as SDXL's ``up_blocks.1`` at 1024 px); one text encoder (last hidden state, no pooled embedding or time ids), and a
negative prompt of None is the empty string encoded (SD has no ``force_zeros_for_empty_prompt``). SD 1.5 ships a
PNDM scheduler; it is converted to Euler with the same config, the sampler the authors ran on SDXL.

Load by file path (one pipeline class per loaded file):

    DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
        custom_pipeline="<repo>/pipeline_style_prompting.py", trust_remote_code=True)
"""

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import replace_example_docstring
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer

# diffusers copies into its module cache only the siblings this file imports itself, so every module that
# style_prompting.py uses is named here.
from .attention_control import KeyValueInjection  # noqa: F401
from .attention_processors import controlled_attention  # noqa: F401
from .inputs import image_to_pixels  # noqa: F401
from .sd_glue import SDGlueMixin, vae_scale_factor_of
from .style_prompting import (
    AUTO,
    CONTROLNET_CONDITIONING_SCALE,
    EARLY_GUIDANCE_STEPS,
    StylePromptingMixin,
    StylePromptingPipelineOutput,
    StyleRequest,
    plan_style_steps,
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers import DiffusionPipeline

        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ...     torch_dtype=torch.float16,
        ...     custom_pipeline="<repo>/pipeline_style_prompting.py",
        ...     trust_remote_code=True,
        ... ).to("cuda")
        >>> out = pipe(
        ...     prompt="A dragon, low-poly game art",
        ...     reference_prompt="A cat, low-poly game art",
        ...     generator=[torch.Generator().manual_seed(s) for s in range(4)],
        ...     reference_generator=torch.Generator().manual_seed(42),
        ... )
        >>> out.images[0].save("dragon.png")
        ```
"""


class StylePromptingPipeline(SDGlueMixin, StylePromptingMixin, DiffusionPipeline):
    r"""Visual Style Prompting on Stable Diffusion 1.x/2.x: generated images take the style of a reference row.

    This model inherits from [`DiffusionPipeline`]; see the superclass documentation for the generic methods
    (downloading, saving, running on a device, offloading).

    Args:
        vae ([`AutoencoderKL`] or [`AutoencoderTiny`]): Encodes a real reference, decodes the outputs.
        text_encoder ([`~transformers.CLIPTextModel`]): Frozen text encoder.
        tokenizer ([`~transformers.CLIPTokenizer`]): Tokenizer of the text encoder.
        unet ([`UNet2DConditionModel`]): The denoising UNet (epsilon or v prediction).
        scheduler ([`SchedulerMixin`]): The reference-from-a-prompt flow runs it (a PNDM scheduler, as SD 1.5
            ships, becomes Euler with the same config); the real-image flow runs the authors' forked DDIM built from
            its config.
        safety_checker ([`StableDiffusionSafetyChecker`]): Optional NSFW classifier; flagged outputs are blacked out.
        feature_extractor ([`~transformers.CLIPImageProcessor`]): Optional, needed by the safety checker.
        controlnet ([`ControlNetModel`]): Optional; the generated rows follow `control_image`, the reference does
            not.
        requires_safety_checker (`bool`): Recorded in the config as in [`StableDiffusionPipeline`].
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "controlnet"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL | AutoencoderTiny,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        controlnet: ControlNetModel | None = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__()
        if isinstance(scheduler, PNDMScheduler):
            # SD 1.5's shipped sampler; Euler from the same config (leading spacing) is the one the authors ran.
            scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            controlnet=controlnet,
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self.vae_scale_factor = vae_scale_factor_of(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        self._guidance_scale, self._num_timesteps, self._interrupt = None, 0, False

    def check_model(self) -> None:
        """An SD 1.x/2.x UNet: text conditioning only."""
        if self.unet.config.addition_embed_type is not None:
            raise ValueError(
                f"`unet` has added conditioning ({self.unet.config.addition_embed_type!r}); for SDXL use "
                "`StylePromptingXLPipeline` (pipeline_style_prompting_xl.py)."
            )

    def encode_prompts(self, request: StyleRequest, device) -> dict[str, torch.Tensor]:
        """The token embeddings of the guided batch ``[uncond reference, uncond generated, cond reference, cond
        generated]``; each distinct prompt is encoded alone, a negative of None is ``""`` (as SD pipelines)."""
        encoded = {}

        def encode(text: str | None) -> torch.Tensor:
            text = text or ""
            if text not in encoded:
                encoded[text] = self.encode_text([text], device)
            return encoded[text]

        rows = [
            encode(request.reference_negative_prompt),
            *map(encode, request.negative_prompts),
            encode(request.reference_prompt),
            *map(encode, request.prompts),
        ]
        return {"prompt_embeds": torch.cat(rows)}

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        reference_prompt: str = None,
        *,
        reference_image: PIL.Image.Image | np.ndarray | torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        reference_negative_prompt=AUTO,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.0,
        early_guidance_scale=AUTO,
        early_guidance_steps: int = EARLY_GUIDANCE_STEPS,
        style_layers: int | list[str] | None = None,
        style_steps=None,
        color_calibration=AUTO,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        reference_generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        control_image=None,
        controlnet_conditioning_scale: float = CONTROLNET_CONDITIONING_SCALE,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        r"""Generate images of `prompt` in the style of a reference.

        Args:
            prompt: What to generate; a list gives several prompts, each with `num_images_per_prompt` images.
            reference_prompt: The reference's prompt: what it is generated from, or a description of the real
                `reference_image`. Required.
            reference_image: A real reference (PIL RGB, `[H, W, 3]` array, `[3, H, W]` tensor in [0, 1]), centre
                cropped to the output's aspect and resized (bicubic). Switches to the real-image flow: the authors'
                forked DDIM (eta 0), the reference row re-noised from a fresh VAE posterior sample every step.
            negative_prompt: The generated rows' negative prompt (one, or one per prompt); None is ``""``.
            reference_negative_prompt: The reference row's; defaults to `negative_prompt`.
            num_images_per_prompt: Generated images per prompt, all in the one reference's style; left at 1, as many
                as a list of `generator`s or the `latents` give.
            num_inference_steps: Denoising steps.
            guidance_scale: Classifier-free guidance scale, for every row (the reference too).
            early_guidance_scale: Guidance scale of the first `early_guidance_steps` steps (the authors' "advanced
                sampling"); None turns it off. Default: 20.0 with a reference prompt, None with `reference_image`
                or `control_image` (as the authors' real-image and ControlNet scripts).
            early_guidance_steps: How many steps use `early_guidance_scale`.
            style_layers: None: the self-attention layers of the decoder's highest-resolution attention level (SD
                1.5: the 3 of ``up_blocks.3``); an int ``k``: the last ``k`` decoder self-attention layers in
                forward order (the totoro preset's analogue is 4); or a list of processor names.
            style_steps: None: swap at every step; a half-open ``(start, end)`` of loop indices, or a list of them.
            color_calibration: ``(start, end)``: in the real-image flow, every row's predicted x0 takes the
                reference's per-channel mean and standard deviation for ``start > t > end``; None turns it off.
                Default: ``(150, 100)`` with `reference_image`, else None (it needs `reference_image`).
            height, width: Output size in pixels, multiples of 64 (default: 512 on SD 1.5).
            generator: One `torch.Generator` per generated image, or one for all; draws their initial latents.
            reference_generator: Draws the reference's initial latent, or the real-image flow's posterior samples
                and noise (posterior sample then noise for all rows, each step). None: the global RNG.
            latents: Initial latents of the generated rows `[N, 4, h, w]`, before scaling by the scheduler's
                `init_noise_sigma`.
            reference_latents: The reference's `[1, 4, h, w]` (unused with `reference_image`).
            control_image: With a `controlnet`: the control image (one, or one per generated image). The reference
                rows get no ControlNet residuals.
            controlnet_conditioning_scale: ControlNet residual scale (the authors' scripts' 0.5).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: Return a [`StylePromptingPipelineOutput`] instead of a tuple ``(images, reference_images)``.
            callback_on_step_end: A function or [`PipelineCallback`] called as ``callback(pipe, step, timestep,
                callback_kwargs)`` after each step; a returned ``"latents"`` (``[reference, generated...]``) or
                ``"prompt_embeds"`` replaces the pipeline's.
            callback_on_step_end_tensor_inputs: Tensors given to the callback, from ``_callback_tensor_inputs``
                (``prompt_embeds`` holds the guided batch's ``2 (1 + N)`` rows).

        Examples:

        Returns:
            [`StylePromptingPipelineOutput`] or the tuple ``(images, reference_images)``.
        """
        # 1. Check every argument before any model runs
        request = self.check_inputs(
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
        )
        device = self._execution_device
        self._guidance_scale, self._interrupt = request.guidance_scale, False

        # 2. Encode the prompts: rows [uncond reference, uncond generated, cond reference, cond generated]
        conditioning = self.encode_prompts(request, device)

        # 3. The sampler: the pipeline's scheduler, or the authors' forked DDIM for a real reference
        sampler = self.prepare_sampler(request, device)
        self._num_timesteps = len(sampler.timesteps)

        # 4. Initial latents [reference, generated...]; a real reference is encoded once
        latents = self.prepare_latents(
            request, latents, reference_latents, reference_generator, sampler.init_noise_sigma
        )
        draw_reference = None if request.reference_pixels is None else self.reference_image_sampler(request)

        # 5. Plan every step: guidance scale, swapping, colour calibration
        plan = plan_style_steps(sampler.timesteps, request)

        # 6. Denoise: in the style layers the generated rows attend to the reference's keys and values
        latents = self.denoise(
            request,
            latents,
            sampler,
            plan,
            conditioning,
            draw_reference,
            reference_generator,
            controlnet_conditioning_scale,
            callback_on_step_end,
        )

        # 7. Decode every row (reference first), blacking out what the safety checker flags
        images = latents
        if output_type != "latent":
            decoded = self.run_safety_checker(self.decode_rows(latents), device, conditioning["prompt_embeds"].dtype)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        images, reference_images = images[1:], images[:1]
        if not return_dict:
            return images, reference_images
        return StylePromptingPipelineOutput(images=images, reference_images=reference_images)
