"""Visual Style Prompting with Swapping Self-Attention (Jeong et al., arXiv 2402.12974) on Stable Diffusion XL.

Images are generated from a text prompt in the style of a reference: in the decoder's late self-attention layers
every generated row keeps its queries and attends to the reference row's keys and values (per classifier-free
guidance half). The reference is generated alongside from `reference_prompt` (flow A), or is a real image re-noised
at every step (flow B, `reference_image`). With default arguments the pipeline reproduces the authors' SDXL code
(``naver-ai/Visual-Style-Prompting``), quirks included; they are named where ``style_prompting.py`` reproduces them.

Load by file path (one pipeline class per loaded file):

    DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
        custom_pipeline="<repo>/pipeline_style_prompting_xl.py", trust_remote_code=True)
"""

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import replace_example_docstring
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# diffusers copies into its module cache only the siblings this file imports itself, so every module that
# style_prompting.py uses is named here.
from .attention_control import KeyValueInjection  # noqa: F401
from .attention_processors import controlled_attention  # noqa: F401
from .inputs import image_to_pixels  # noqa: F401
from .sd_glue import vae_scale_factor_of
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
        >>> from diffusers.utils import load_image

        >>> pipe = DiffusionPipeline.from_pretrained(
        ...     "stabilityai/stable-diffusion-xl-base-1.0",
        ...     torch_dtype=torch.float16,
        ...     custom_pipeline="<repo>/pipeline_style_prompting_xl.py",
        ...     trust_remote_code=True,
        ... ).to("cuda")
        >>> out = pipe(
        ...     prompt="A dragon, low-poly game art",
        ...     reference_prompt="A cat, low-poly game art",
        ...     generator=[torch.Generator().manual_seed(s) for s in range(4)],
        ...     reference_generator=torch.Generator().manual_seed(42),
        ... )
        >>> out.reference_images[0].save("reference.png")
        >>> out.images[0].save("dragon.png")
        ```
"""


class StylePromptingXLPipeline(StylePromptingMixin, DiffusionPipeline):
    r"""Visual Style Prompting on Stable Diffusion XL: generated images take the style of a reference row.

    This model inherits from [`DiffusionPipeline`]; see the superclass documentation for the generic methods
    (downloading, saving, running on a device, offloading).

    Args:
        vae ([`AutoencoderKL`] or [`AutoencoderTiny`]): Encodes a real reference, decodes the outputs.
        text_encoder ([`~transformers.CLIPTextModel`]): SDXL's first text encoder (optional).
        text_encoder_2 ([`~transformers.CLIPTextModelWithProjection`]): SDXL's second text encoder (pooled output).
        tokenizer ([`~transformers.CLIPTokenizer`]): Tokenizer of `text_encoder` (optional).
        tokenizer_2 ([`~transformers.CLIPTokenizer`]): Tokenizer of `text_encoder_2`.
        unet ([`UNet2DConditionModel`]): SDXL's UNet (``addition_embed_type="text_time"``).
        scheduler ([`SchedulerMixin`]): The reference-from-a-prompt flow runs it (SDXL ships Euler, as the authors
            ran); the real-image flow runs the authors' forked DDIM built from its config.
        controlnet ([`ControlNetModel`]): Optional; the generated rows follow `control_image`, the reference does
            not (the authors' edge and depth scripts).
        force_zeros_for_empty_prompt (`bool`): A negative prompt of None gives zero embeddings (SDXL base's
            setting), else the empty string is encoded.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["tokenizer", "text_encoder", "controlnet"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    _upcast_vae = True

    def __init__(
        self,
        vae: AutoencoderKL | AutoencoderTiny,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler,
        controlnet: ControlNetModel | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            controlnet=controlnet,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = vae_scale_factor_of(vae)
        # The reference resizes a real reference with Pillow's bicubic filter, not diffusers' lanczos.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        self._guidance_scale, self._num_timesteps, self._interrupt = None, 0, False

    def check_model(self) -> None:
        """SDXL's UNet conditioning: pooled text embeddings and six time ids."""
        if self.unet.config.addition_embed_type != "text_time":
            raise ValueError(
                "`unet` is not an SDXL UNet (addition_embed_type 'text_time'); use `StylePromptingPipeline` "
                "(pipeline_style_prompting.py) for SD 1.x/2.x."
            )
        if self.text_encoder_2 is None or self.tokenizer_2 is None:
            raise ValueError("`text_encoder_2` and `tokenizer_2` are required (they give the pooled embedding).")
        expected = self.unet.add_embedding.linear_1.in_features
        given = 6 * self.unet.config.addition_time_embed_dim + self.text_encoder_2.config.projection_dim
        if expected != given:
            raise ValueError(
                f"The UNet expects {expected} added conditioning features, but six time ids and the pooled "
                f"embedding of `text_encoder_2` give {given}."
            )

    def encode_text(self, text: str, device) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's conditioning of one prompt: the penultimate hidden states of both encoders concatenated
        `[1, 77, D1 + D2]`, and the second encoder's pooled projection `[1, P]`."""
        hidden_states, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            if encoder is None:
                continue
            input_ids = tokenizer(
                text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            output = encoder(input_ids.to(device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]  # the projection of CLIPTextModelWithProjection, the last encoder
        return torch.cat(hidden_states, dim=-1), pooled

    def encode_prompts(self, request: StyleRequest, device) -> dict[str, torch.Tensor]:
        """The conditioning of the guided batch ``[uncond reference, uncond generated, cond reference, cond
        generated]``.

        Each distinct prompt is encoded alone, as the reference does (batched encoding moves the pooled embedding
        by ~2e-7). A negative prompt of None gives zeros under ``force_zeros_for_empty_prompt`` (quirk 6), and
        ``""`` is encoded.
        """
        encoded = {}

        def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            if text not in encoded:
                encoded[text] = self.encode_text(text, device)
            return encoded[text]

        reference = encode(request.reference_prompt)

        def negative(text: str | None) -> tuple[torch.Tensor, torch.Tensor]:
            if text is None and self.config.force_zeros_for_empty_prompt:
                return torch.zeros_like(reference[0]), torch.zeros_like(reference[1])
            return encode(text or "")

        rows = [
            negative(request.reference_negative_prompt),
            *map(negative, request.negative_prompts),
            reference,
            *map(encode, request.prompts),
        ]
        prompt_embeds, pooled = (torch.cat(parts) for parts in zip(*rows))
        # Original size, crop offset and target size; the negative rows get the same ids.
        time_ids = [request.height, request.width, 0, 0, request.height, request.width]
        add_time_ids = torch.tensor([time_ids] * len(rows), dtype=prompt_embeds.dtype, device=device)
        return {"prompt_embeds": prompt_embeds, "add_text_embeds": pooled, "add_time_ids": add_time_ids}

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
            reference_prompt: The reference's prompt: what it is generated from (flow A), or a description of the
                real `reference_image` (flow B; the authors caption it with BLIP-2). Required.
            reference_image: A real reference (PIL RGB, `[H, W, 3]` array, `[3, H, W]` tensor in [0, 1]), centre
                cropped to the output's aspect and resized (bicubic). Switches to flow B: the authors' forked DDIM
                (eta 0), the reference row re-noised from a fresh VAE posterior sample every step.
            negative_prompt: The generated rows' negative prompt (one, or one per prompt); None gives zero
                embeddings under `force_zeros_for_empty_prompt` (SDXL base), ``""`` is encoded.
            reference_negative_prompt: The reference row's; defaults to `negative_prompt`.
            num_images_per_prompt: Generated images per prompt, all in the one reference's style; left at 1, as many
                as a list of `generator`s or the `latents` give.
            num_inference_steps: Denoising steps.
            guidance_scale: Classifier-free guidance scale, for every row (the reference too).
            early_guidance_scale: Guidance scale of the first `early_guidance_steps` steps (the authors' "advanced
                sampling"); None turns it off. Default: 20.0 with a reference prompt, None with `reference_image`
                or `control_image` (as the authors' real-image and ControlNet scripts).
            early_guidance_steps: How many steps use `early_guidance_scale`.
            style_layers: None: the self-attention layers of the decoder's highest-resolution attention level (the
                6 of ``up_blocks.1``); an int ``k``: the last ``k`` decoder self-attention layers in forward order
                (the totoro preset's slice ``[108, 140)`` is 16); or a list of processor names.
            style_steps: None: swap at every step; a half-open ``(start, end)`` of loop indices, or a list of them.
                The authors' inclusive window ``[a, b]`` is ``(a, b + 1)``.
            color_calibration: ``(start, end)``: in flow B, every row's predicted x0 takes the reference's
                per-channel mean and standard deviation for ``start > t > end``; None turns it off. Default:
                ``(150, 100)`` with `reference_image`, else None (it needs `reference_image`).
            height, width: Output size in pixels (default: the UNet's sample size times the VAE factor, 1024).
            generator: One `torch.Generator` per generated image, or one for all; draws their initial latents.
            reference_generator: Draws the reference's initial latent (flow A), or the posterior samples and noise
                of the re-noising (flow B, posterior sample then noise for all rows, each step). None: the global
                RNG (the authors' real-image script uses it unseeded).
            latents: Initial latents of the generated rows `[N, 4, h, w]`, before scaling by the scheduler's
                `init_noise_sigma`.
            reference_latents: The reference's `[1, 4, h, w]` (flow A; flow B replaces the row before any step).
            control_image: With a `controlnet`: the control image (one, or one per generated image). The reference
                rows get no ControlNet residuals.
            controlnet_conditioning_scale: ControlNet residual scale (the authors' scripts' 0.5).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: Return a [`StylePromptingPipelineOutput`] instead of a tuple ``(images, reference_images)``.
            callback_on_step_end: A function or [`PipelineCallback`] called as ``callback(pipe, step, timestep,
                callback_kwargs)`` after each step; a returned ``"latents"`` (``[reference, generated...]``) or
                embedding replaces the pipeline's.
            callback_on_step_end_tensor_inputs: Tensors given to the callback, from ``_callback_tensor_inputs``
                (``prompt_embeds`` and the added conditioning hold the guided batch's ``2 (1 + N)`` rows).

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

        # 3. The sampler: the pipeline's scheduler (flow A), or the authors' forked DDIM (flow B)
        sampler = self.prepare_sampler(request, device)
        self._num_timesteps = len(sampler.timesteps)

        # 4. Initial latents [reference, generated...]; flow B encodes the real reference once
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

        # 7. Decode every row (reference first)
        images = latents
        if output_type != "latent":
            images = self.image_processor.postprocess(self.decode_rows(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        images, reference_images = images[1:], images[:1]
        if not return_dict:
            return images, reference_images
        return StylePromptingPipelineOutput(images=images, reference_images=reference_images)
