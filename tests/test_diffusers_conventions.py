"""`CrossImageAttentionPipeline` where a diffusers user meets it, in the style of diffusers' own pipeline tests:
save/load, `from_pipe`, schedulers set after loading, callbacks, input and output types, another VAE class."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderTiny, EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.callbacks import PipelineCallback
from tiny_models import build_tiny_components, seeded

from cross_image_attention import CrossImageAttentionPipeline
from cross_image_attention.sd_glue import vae_scale_factor_of

# Four denoising steps at 64 px: every feature once, and fast.
CALL = {
    "height": 64,
    "width": 64,
    "num_inference_steps": 6,
    "skip_steps": 2,
    "cross_attn_32_range": (0, 4),
    "cross_attn_64_range": (0, 4),
    "adain_range": (1, 4),
    "domain_name": "animal",
    "use_masked_adain": False,
}


def square(image: PIL.Image.Image) -> PIL.Image.Image:
    return image.resize((64, 64), PIL.Image.BICUBIC)


@pytest.fixture(scope="module")
def pair(cat_image, astronaut_image):
    return square(astronaut_image), square(cat_image)


def latents_of(pipe, pair, **overrides) -> torch.Tensor:
    kwargs = {**CALL, "output_type": "latent", "generator": seeded(0), **overrides}
    return pipe(appearance_image=pair[0], structure_image=pair[1], **kwargs).images


def test_save_and_load_round_trip(tiny_pipe, pair, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    loaded = CrossImageAttentionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    torch.testing.assert_close(latents_of(loaded, pair), latents_of(tiny_pipe, pair), rtol=0, atol=1e-5)


def test_from_pipe_and_a_scheduler_set_after_loading(saved_sd_dir):
    sd = StableDiffusionPipeline.from_pretrained(saved_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe = CrossImageAttentionPipeline.from_pipe(sd)
    assert pipe.unet is sd.unet and pipe.vae is sd.vae
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # SD's PNDM config, converted
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    image = PIL.Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="`scheduler` is a EulerDiscreteScheduler.*DDIMScheduler.from_config"):
        pipe(appearance_image=image, structure_image=image, **CALL)
    with pytest.raises(ValueError, match="`scheduler`"):
        pipe.invert(image, height=64, width=64, num_inference_steps=4, skip_steps=1)


class RecordingCutoff(PipelineCallback):
    """A diffusers-style cut-off callback: it reads `pipeline.num_timesteps` to find its step, as diffusers' own do."""

    tensor_inputs = ["latents"]

    def __init__(self, cutoff_step_ratio=1.0, cutoff_step_index=None):
        super().__init__(cutoff_step_ratio=cutoff_step_ratio, cutoff_step_index=cutoff_step_index)
        self.steps = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        cutoff = int(pipeline.num_timesteps * self.config.cutoff_step_ratio)
        self.steps.append((step_index, cutoff, tuple(callback_kwargs["latents"].shape)))
        if step_index == cutoff:  # never, at ratio 1.0
            callback_kwargs = {"latents": callback_kwargs["latents"] * 0}
        return callback_kwargs


def test_callbacks_pipeline_callback_objects_and_none(tiny_pipe, pair):
    cutoff = RecordingCutoff()
    out = latents_of(tiny_pipe, pair, callback_on_step_end=cutoff)
    # num_timesteps is readable while running; the latents are the [OUT, APP, STRUCT] batch
    assert cutoff.steps == [(i, 4, (3, 4, 8, 8)) for i in range(4)]
    # a callback that returns None changes nothing
    calls = []
    returns_none = latents_of(tiny_pipe, pair, callback_on_step_end=lambda pipe, i, t, kwargs: calls.append(i))
    assert calls == [0, 1, 2, 3]
    torch.testing.assert_close(returns_none, out, rtol=0, atol=0)


def test_pt_np_pil_inputs_and_outputs(tiny_pipe, pair):
    as_np = [np.array(image) for image in pair]  # uint8 [H, W, 3]
    as_pt = [torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in as_np]  # float [3, H, W]
    outputs = {}
    for name, images, output_type in (("pil", pair, "pil"), ("np", as_np, "np"), ("pt", as_pt, "pt")):
        kwargs = {**CALL, "output_type": output_type, "generator": seeded(0)}
        outputs[name] = tiny_pipe(appearance_image=images[0], structure_image=images[1], **kwargs).images
    assert isinstance(outputs["pil"][0], PIL.Image.Image)
    assert isinstance(outputs["np"], np.ndarray) and outputs["np"].shape == (1, 64, 64, 3)
    assert isinstance(outputs["pt"], torch.Tensor) and outputs["pt"].shape == (1, 3, 64, 64)
    np.testing.assert_allclose(outputs["pt"].permute(0, 2, 3, 1).numpy(), outputs["np"], atol=1e-3)
    assert np.abs(np.asarray(outputs["pil"][0]) / 255 - outputs["np"][0]).max() <= 1 / 255 + 1e-6


def test_autoencoder_tiny(pair):
    components = build_tiny_components()
    components["vae"] = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).eval()
    assert vae_scale_factor_of(components["vae"]) == 8
    assert vae_scale_factor_of(dict(components["vae"].config)) == 8
    pipe = CrossImageAttentionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8 and pipe.size_multiple == 64
    inversion = pipe.invert(pair[0], **{k: CALL[k] for k in ("height", "width", "num_inference_steps", "skip_steps")})
    assert inversion.latents.shape == (1, 4, 8, 8)
    out = pipe(appearance_image=pair[0], structure_image=pair[1], generator=seeded(0), **CALL).images[0]
    assert out.size == (64, 64)
