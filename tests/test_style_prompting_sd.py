"""Visual Style Prompting on SD 1.x/2.x, tested by its properties (the authors released no SD code), the style layer
rules on SD 1.5's and SDXL's real block structures, and ControlNet on both pipelines."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from test_style_prompting import QUICK, build_tiny_sdxl_components, max_diff, seeded, single_thread  # noqa: F401
from tiny_models import build_tiny_components

from cross_image_attention.attention_processors import list_attention_layers
from cross_image_attention.pipeline_style_prompting import StylePromptingPipeline
from cross_image_attention.pipeline_style_prompting_xl import StylePromptingXLPipeline
from cross_image_attention.style_prompting import select_style_layers

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = {"height": 64, "width": 64}
STEPS = 4
EARLY_STEPS = 3  # the reference's CFG 20 steps


@pytest.fixture(scope="module")
def sd_components():
    components = build_tiny_components()
    # As SD 1.5 ships it; the pipeline converts it to Euler.
    components["scheduler"] = PNDMScheduler.from_config(components["scheduler"].config, skip_prk_steps=True)
    return components


@pytest.fixture(scope="module")
def sdxl_components():
    return build_tiny_sdxl_components()


@pytest.fixture(scope="module")
def sd_pipe(sd_components):
    pipe = StylePromptingPipeline(
        **sd_components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stock(sd_components, sd_pipe):
    """Stock `StableDiffusionPipeline` with the same Euler scheduler."""
    scheduler = EulerDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    pipe = StableDiffusionPipeline(
        **{**sd_components, "scheduler": scheduler},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def initial():
    return torch.randn(3, 4, 8, 8, generator=seeded(0))  # [reference, two generated]


def early_guidance(pipe, i, t, kwargs):
    """Gives the stock pipeline the reference's guidance schedule: 20 on the first three steps, then 7."""
    if i == EARLY_STEPS - 1:
        pipe._guidance_scale = 7.0
    return {}


def stock_generation(stock, prompt, latents):
    return stock(
        prompt,
        latents=latents,
        num_images_per_prompt=len(latents),
        num_inference_steps=STEPS,
        guidance_scale=20.0,
        callback_on_step_end=early_guidance,
        output_type="latent",
        **SIZE,
    ).images


@pytest.fixture(scope="module")
def runs(sd_pipe, initial):
    """The same call with swapping at every step (default) and at none."""

    def call(**kwargs):
        output = sd_pipe(
            "a dog",
            "a cat",
            latents=initial[1:],
            reference_latents=initial[:1],
            num_images_per_prompt=2,
            num_inference_steps=STEPS,
            output_type="latent",
            **SIZE,
            **kwargs,
        )
        return torch.cat([output.reference_images, output.images])

    return {"swapped": call(), "plain": call(style_steps=[])}


def tolerance(expected: torch.Tensor) -> float:
    # Batch composition and per-prompt encoding move the last bits; CFG 20 amplifies them.
    return 1e-4 + 1e-5 * expected.abs().max().item()


def test_pndm_becomes_euler(sd_pipe):
    assert isinstance(sd_pipe.scheduler, EulerDiscreteScheduler)
    assert sd_pipe.scheduler.config.timestep_spacing == "leading"


def test_without_swapping_generated_rows_equal_stock_sd(runs, stock, initial):
    expected = stock_generation(stock, "a dog", initial[1:])
    assert max_diff(runs["plain"][1:], expected) <= tolerance(expected)


def test_reference_row_equals_a_plain_generation_of_the_reference_prompt(runs, stock, initial):
    expected = stock_generation(stock, "a cat", initial[:1])
    assert max_diff(runs["swapped"][:1], expected) <= tolerance(expected)


def test_swapping_changes_only_the_generated_rows(runs):
    assert max_diff(runs["swapped"][:1], runs["plain"][:1]) < 1e-6
    for row in (1, 2):
        assert max_diff(runs["swapped"][row], runs["plain"][row]) > 1e-2
    assert torch.isfinite(runs["swapped"]).all()


def test_style_layers_on_real_block_structures():
    """SD 1.5: the 3 self-attention layers of up_blocks.3 (the authors' totoro slice maps to the last 4); SDXL: the 6
    of up_blocks.1 (totoro: the last 16 = the reference's slice [108, 140))."""
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
        )
    expected = [f"up_blocks.3.attentions.{i}.transformer_blocks.0.attn1.processor" for i in range(3)]
    assert select_style_layers(sd15, None) == expected
    assert select_style_layers(sd15, 4) == ["up_blocks.2.attentions.2.transformer_blocks.0.attn1.processor", *expected]
    positions = {layer.name: layer.position for layer in list_attention_layers(sd15)}
    assert [positions[name] for name in select_style_layers(sd15, 4)] == [24, 26, 28, 30]  # in [24, 32)


def test_load_by_file_path_and_from_pipe(saved_sd_dir, sd_pipe):
    def quick(pipe):
        out = pipe("a dog", "a cat", generator=seeded(0), reference_generator=seeded(1), **QUICK, **SIZE)
        return torch.cat([out.reference_images, out.images])

    pipe = DiffusionPipeline.from_pretrained(
        saved_sd_dir, custom_pipeline=str(REPO_ROOT / "pipeline_style_prompting.py"), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StylePromptingPipeline" and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    expected = quick(sd_pipe)
    assert max_diff(quick(pipe), expected) < 1e-4
    base = StableDiffusionPipeline.from_pretrained(saved_sd_dir, safety_checker=None)
    derived = DiffusionPipeline.from_pipe(
        base, custom_pipeline=str(REPO_ROOT / "pipeline_style_prompting.py"), trust_remote_code=True
    )
    derived.set_progress_bar_config(disable=True)
    assert derived.unet is base.unet and isinstance(base.scheduler, PNDMScheduler)
    assert max_diff(quick(derived), expected) < 1e-4


def test_real_image_flow_on_sd(sd_pipe):
    image = PIL.Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8))
    out = sd_pipe("a dog", "noise", reference_image=image, num_inference_steps=3, generator=seeded(0), **SIZE)
    assert out.reference_images[0].size == (64, 64) and np.isfinite(np.asarray(out.images[0])).all()


def test_wrong_unet_for_the_pipeline(sd_components, sdxl_components):
    xl_unet = sdxl_components["unet"]
    with pytest.raises(ValueError, match="`unet`"):
        StylePromptingPipeline(
            **{**sd_components, "unet": xl_unet},
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )("a", "b")
    with pytest.raises(ValueError, match="`unet`"):
        StylePromptingXLPipeline(**{**sdxl_components, "unet": sd_components["unet"]})("a", "b")


def tiny_controlnet(unet) -> ControlNetModel:
    """A ControlNet from the UNet with random (not zero) output convolutions, so that it changes something."""
    controlnet = ControlNetModel.from_unet(unet)
    torch.manual_seed(0)
    for block in (controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
        for parameter in block.parameters():
            torch.nn.init.normal_(parameter, std=0.1)
    return controlnet.eval()


@pytest.mark.parametrize("flavour", ["sd", "sdxl"])
def test_controlnet_leaves_the_reference_alone(flavour, sd_components, sdxl_components):
    if flavour == "sd":
        components = {**sd_components, "safety_checker": None, "feature_extractor": None}
        pipeline_class, size = StylePromptingPipeline, SIZE
    else:
        components, pipeline_class, size = sdxl_components, StylePromptingXLPipeline, {}
    plain = pipeline_class(**components)
    controlled = pipeline_class(**components, controlnet=tiny_controlnet(components["unet"]))
    for pipe in (plain, controlled):
        pipe.set_progress_bar_config(disable=True)
    control = PIL.Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))

    def call(pipe, **kwargs):
        out = pipe("a dog", "a cat", generator=seeded(0), reference_generator=seeded(1), **QUICK, **size, **kwargs)
        return torch.cat([out.reference_images, out.images])

    # Without a control image the reference flow keeps its early guidance; the ControlNet scripts never apply it.
    without = call(plain, early_guidance_scale=None)
    with_control = call(controlled, control_image=control)
    assert max_diff(with_control[:1], without[:1]) < 1e-5  # the reference rows get no residuals
    assert max_diff(with_control[1:], without[1:]) > 1e-3
    unscaled = call(controlled, control_image=control, controlnet_conditioning_scale=0.0)
    assert max_diff(unscaled, without) < 1e-5
    with pytest.raises(ValueError, match="`control_image`"):
        call(controlled)
