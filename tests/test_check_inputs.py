"""`check_inputs` runs every check before any model call, including the checks on the model's parts (the layers
self-segmentation needs, the scheduler, the prediction type), which used to fire only after both inversions."""

from contextlib import contextmanager

import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from tiny_models import SMALL_CALL, TINY_SD, build_tiny_components, seeded

from cross_image_attention import CrossImageAttentionPipeline, InversionResult


def _pipeline(**components) -> CrossImageAttentionPipeline:
    parts = {**build_tiny_components(), **components}
    pipe = CrossImageAttentionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _model_calls(pipe):
    """Records every call of the UNet, the VAE encoder and the text encoder inside the block."""
    calls = []
    handles = [
        module.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
        for module in (pipe.unet, pipe.vae.encoder, pipe.text_encoder)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def test_segmentation_without_a_capture_layer_fails_before_any_model_call(cat_image, astronaut_image):
    # A decoder with a single attention level has no cross-attention layer at the second level.
    config = UNet2DConditionModel.load_config(TINY_SD / "unet")
    config["up_block_types"] = ["UpBlock2D", "UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]
    torch.manual_seed(0)
    pipe = _pipeline(unet=UNet2DConditionModel.from_config(config).eval())
    with _model_calls(pipe) as calls:
        with pytest.raises(
            ValueError, match="Self-segmentation needs a cross-attention layer.*use_masked_adain=False"
        ):
            pipe(cat_image, astronaut_image, generator=seeded(0), **{**SMALL_CALL, "use_masked_adain": True})
    assert calls == []
    # Without self-segmentation the same UNet works (one attention level takes part).
    out = pipe(cat_image, astronaut_image, generator=seeded(0), output_type="latent", **SMALL_CALL)
    assert torch.isfinite(out.images).all()


def test_unusable_prediction_type_fails_before_any_model_call(cat_image, astronaut_image):
    components = build_tiny_components()
    scheduler = components.pop("scheduler")
    pipe = _pipeline(**components, scheduler=type(scheduler).from_config(scheduler.config, prediction_type="sample"))
    with _model_calls(pipe) as calls:
        with pytest.raises(ValueError, match="prediction_type 'sample'"):
            pipe(cat_image, astronaut_image, generator=seeded(0), **SMALL_CALL)
        with pytest.raises(ValueError, match="prediction_type 'sample'"):
            pipe.invert(cat_image, height=64, width=64, num_inference_steps=4, skip_steps=1)
    assert calls == []


def test_a_scheduler_swapped_after_loading_is_refused_with_one_clear_error(cat_image, astronaut_image):
    pipe = _pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with _model_calls(pipe) as calls:
        with pytest.raises(ValueError, match="`scheduler` is a EulerDiscreteScheduler.*DDIMScheduler.from_config"):
            pipe(cat_image, astronaut_image, generator=seeded(0), **SMALL_CALL)
    assert calls == []


def test_given_inversions_are_checked_before_the_other_image_is_inverted(tiny_pipe, cat_image):
    settings = {key: SMALL_CALL[key] for key in ("height", "width", "num_inference_steps", "skip_steps")}
    inversion = tiny_pipe.invert(cat_image, domain_name="animal", generator=seeded(0), **settings)
    broken = InversionResult(inversion.latents * float("nan"), inversion.noise, inversion.timesteps)
    with _model_calls(tiny_pipe) as calls:
        with pytest.raises(ValueError, match="reference_freeu=True but this call uses reference_freeu=False"):
            tiny_pipe(cat_image, structure_inversion=inversion, reference_freeu=False, **SMALL_CALL)
        with pytest.raises(ValueError, match="structure_inversion.*non-finite"):
            tiny_pipe(cat_image, structure_inversion=broken, **SMALL_CALL)
    assert calls == []


def test_reference_freeu_off_changes_the_result_and_is_recorded(tiny_pipe, cat_image, astronaut_image):
    call = {**SMALL_CALL, "output_type": "latent", "generator": seeded(0)}
    with_freeu = tiny_pipe(cat_image, astronaut_image, **call)
    without = tiny_pipe(cat_image, astronaut_image, **{**call, "generator": seeded(0)}, reference_freeu=False)
    assert with_freeu.structure_inversion.reference_freeu is True
    assert without.structure_inversion.reference_freeu is False
    assert (with_freeu.images - without.images).abs().max() > 1e-3
