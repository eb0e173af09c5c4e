"""Behaviour of the pipeline at small sizes: outputs, batching, inversions, masks, callbacks, processors, errors."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
from tiny_models import SMALL_CALL, build_tiny_pipeline, seeded

from cross_image_attention import CrossImageAttentionPipelineOutput, InversionResult


def run(pipe, appearance, structure, **overrides):
    kwargs = {**SMALL_CALL, "generator": seeded(0), **overrides}
    return pipe(appearance, structure, **kwargs)


def processor_state(unet):
    return {name: (type(proc), id(proc)) for name, proc in unet.attn_processors.items()}


def pre_hook_counts(unet):
    return [len(block._forward_pre_hooks) for block in unet.up_blocks]


def test_output_types_agree(tiny_pipe, cat_image, astronaut_image):
    outputs = {kind: run(tiny_pipe, cat_image, astronaut_image, output_type=kind) for kind in ("pil", "np", "pt")}
    latent = run(tiny_pipe, cat_image, astronaut_image, output_type="latent").images
    assert isinstance(outputs["pil"], CrossImageAttentionPipelineOutput)
    assert isinstance(outputs["pil"].images[0], PIL.Image.Image) and outputs["pil"].images[0].size == (64, 64)
    np_images, pt_images = outputs["np"].images, outputs["pt"].images
    assert np_images.shape == (1, 64, 64, 3) and pt_images.shape == (1, 3, 64, 64)
    assert np.allclose(np_images, pt_images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert np.abs(np.asarray(outputs["pil"].images[0]) / 255.0 - np_images[0]).max() <= 1 / 255
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    decoded = tiny_pipe.vae.decode(latent / tiny_pipe.vae.config.scaling_factor).sample
    assert torch.allclose((decoded / 2 + 0.5).clamp(0, 1), pt_images, atol=1e-5)


def test_return_dict_false_is_the_same_tuple(tiny_pipe, cat_image, astronaut_image):
    as_dict = run(tiny_pipe, cat_image, astronaut_image, output_type="latent", return_reconstructions=True)
    as_tuple = run(
        tiny_pipe, cat_image, astronaut_image, output_type="latent", return_reconstructions=True, return_dict=False
    )
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 5
    for index, name in enumerate(("images", "appearance_reconstructions", "structure_reconstructions")):
        assert torch.equal(as_tuple[index], getattr(as_dict, name))
    assert torch.equal(as_tuple[3].latents, as_dict.appearance_inversion.latents)
    assert torch.equal(as_tuple[4].noise, as_dict.structure_inversion.noise)


def test_reconstructions_only_when_requested(tiny_pipe, cat_image, astronaut_image):
    plain = run(tiny_pipe, cat_image, astronaut_image, output_type="np")
    assert plain.appearance_reconstructions is None and plain.structure_reconstructions is None
    full = run(tiny_pipe, cat_image, astronaut_image, output_type="np", return_reconstructions=True)
    assert full.appearance_reconstructions.shape == full.structure_reconstructions.shape == (1, 64, 64, 3)
    assert np.allclose(full.images, plain.images, atol=1e-5)
    assert isinstance(full.appearance_inversion, InversionResult)
    assert full.appearance_inversion.latents.shape == (1, 4, 8, 8)
    assert full.structure_inversion.noise.shape == (1, 7, 4, 8, 8)


def test_outputs_differ_from_plain_reconstruction(tiny_pipe, cat_image, astronaut_image):
    """Cross-image attention, guidance and AdaIN change the output branch away from the structure branch."""
    out = run(tiny_pipe, cat_image, astronaut_image, output_type="latent", return_reconstructions=True)
    assert (out.images - out.structure_reconstructions).abs().max() > 1e-2
    no_transfer = run(
        tiny_pipe,
        cat_image,
        astronaut_image,
        output_type="latent",
        return_reconstructions=True,
        cross_attn_32_range=(0, 0),
        cross_attn_64_range=(0, 0),
        adain_range=(0, 0),
    )
    # With nothing mixed, guided or normalised, the output branch is the structure branch.
    assert torch.allclose(no_transfer.images, no_transfer.structure_reconstructions, atol=1e-5)


def test_batch_of_pairs_equals_each_pair_alone(tiny_pipe, cat_image, astronaut_image):
    batch = tiny_pipe(
        [cat_image, astronaut_image],
        [astronaut_image, cat_image],
        **{**SMALL_CALL, "generator": [seeded(1), seeded(2)], "output_type": "latent"},
    )
    first = run(tiny_pipe, cat_image, astronaut_image, generator=seeded(1), output_type="latent")
    second = run(tiny_pipe, astronaut_image, cat_image, generator=seeded(2), output_type="latent")
    assert batch.images.shape == (2, 4, 8, 8)
    assert torch.allclose(batch.images[0], first.images[0], atol=1e-4)
    assert torch.allclose(batch.images[1], second.images[0], atol=1e-4)
    assert not torch.allclose(batch.images[0], batch.images[1], atol=1e-2)


def test_one_structure_broadcasts_against_many_appearances(tiny_pipe, cat_image, astronaut_image):
    flipped = cat_image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
    out = tiny_pipe(
        [cat_image, flipped],
        astronaut_image,
        **{**SMALL_CALL, "generator": [seeded(1), seeded(1)], "output_type": "latent"},
    )
    assert out.images.shape == (2, 4, 8, 8)
    assert torch.allclose(out.structure_inversion.latents[0], out.structure_inversion.latents[1])
    assert not torch.allclose(out.images[0], out.images[1], atol=1e-3)


def test_precomputed_inversions_equal_inverting_in_the_call(tiny_pipe, cat_image, astronaut_image, tmp_path):
    inline = run(tiny_pipe, cat_image, astronaut_image, output_type="latent")
    settings = {k: SMALL_CALL[k] for k in ("num_inference_steps", "skip_steps", "height", "width", "domain_name")}
    generator = seeded(0)  # one generator: the appearance draws first, then the structure (the reference's order)
    app = tiny_pipe.invert(cat_image, generator=generator, **settings)
    struct = tiny_pipe.invert(astronaut_image, generator=generator, **settings)
    app.save(tmp_path / "app.safetensors")
    reloaded = InversionResult.load(tmp_path / "app.safetensors")
    out = tiny_pipe(
        appearance_inversion=reloaded,
        structure_inversion=struct,
        **{**SMALL_CALL, "output_type": "latent"},
    )
    # Inverting one image per UNet call instead of all four rows at once changes rounding (~1e-6), which the division
    # by small sigmas amplifies in the noise maps (measured 6.7e-5) and leaves ~1.5e-5 on the output latents.
    assert torch.allclose(out.images, inline.images, atol=1e-4)
    assert torch.allclose(reloaded.noise, inline.appearance_inversion.noise, atol=1e-4)


def test_an_image_and_an_inversion_can_be_mixed(tiny_pipe, cat_image, astronaut_image):
    settings = {k: SMALL_CALL[k] for k in ("num_inference_steps", "skip_steps", "height", "width", "domain_name")}
    app = tiny_pipe.invert(cat_image, generator=seeded(5), **settings)
    out = tiny_pipe(
        appearance_inversion=app, structure_image=astronaut_image, **{**SMALL_CALL, "output_type": "latent"}
    )
    assert out.appearance_inversion.latents.shape == (1, 4, 8, 8)
    assert torch.equal(out.appearance_inversion.latents, app.latents)


def test_full_masks_equal_plain_adain_and_empty_masks_fall_back(tiny_pipe, cat_image, astronaut_image, caplog):
    plain = run(tiny_pipe, cat_image, astronaut_image, output_type="latent")
    full = np.ones((100, 100), dtype=np.uint8)
    masked_full = run(
        tiny_pipe,
        cat_image,
        astronaut_image,
        output_type="latent",
        use_masked_adain=True,
        appearance_mask=full,
        structure_mask=PIL.Image.fromarray(full * 255),
    )
    assert torch.allclose(masked_full.images, plain.images, atol=1e-5)

    half = torch.zeros(64, 64)
    half[:, :32] = 1
    masked_half = run(
        tiny_pipe,
        cat_image,
        astronaut_image,
        output_type="latent",
        use_masked_adain=True,
        appearance_mask=half,
        structure_mask=half,
    )
    assert not torch.allclose(masked_half.images, plain.images, atol=1e-3)

    with caplog.at_level(logging.WARNING):
        empty = run(
            tiny_pipe,
            cat_image,
            astronaut_image,
            output_type="latent",
            use_masked_adain=True,
            appearance_mask=torch.zeros(64, 64),
            structure_mask=half,
        )
    assert torch.isfinite(empty.images).all()
    assert torch.allclose(empty.images, plain.images, atol=1e-5)
    assert "plain AdaIN" in caplog.text


def test_self_segmentation_masks_run_and_stay_finite(tiny_pipe, cat_image, astronaut_image):
    out = run(tiny_pipe, cat_image, astronaut_image, output_type="latent", use_masked_adain=True)
    plain = run(tiny_pipe, cat_image, astronaut_image, output_type="latent")
    assert torch.isfinite(out.images).all()
    assert out.images.shape == plain.images.shape


def test_callback_sees_every_step_and_can_replace_latents(tiny_pipe, cat_image, astronaut_image):
    seen = []

    def zero_at_last_step(pipe, step, timestep, tensors):
        seen.append((step, int(timestep), tuple(tensors["latents"].shape)))
        if step == 6:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    out = run(tiny_pipe, cat_image, astronaut_image, output_type="latent", callback_on_step_end=zero_at_last_step)
    assert [s[0] for s in seen] == list(range(7))
    assert [s[1] for s in seen] == list(range(601, 0, -100))
    assert all(s[2] == (3, 4, 8, 8) for s in seen)
    assert torch.count_nonzero(out.images) == 0


def test_processors_and_hooks_are_restored_after_a_call_and_after_an_error(tiny_pipe, cat_image, astronaut_image):
    before, hooks_before = processor_state(tiny_pipe.unet), pre_hook_counts(tiny_pipe.unet)
    run(tiny_pipe, cat_image, astronaut_image, output_type="latent")
    assert processor_state(tiny_pipe.unet) == before and pre_hook_counts(tiny_pipe.unet) == hooks_before

    def fail(pipe, step, timestep, tensors):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        run(tiny_pipe, cat_image, astronaut_image, output_type="latent", callback_on_step_end=fail)
    assert processor_state(tiny_pipe.unet) == before and pre_hook_counts(tiny_pipe.unet) == hooks_before


def test_user_processors_are_honoured_and_restored(cat_image, astronaut_image):
    from diffusers.models.attention_processor import AttnProcessor

    pipe = build_tiny_pipeline()
    reference = run(pipe, cat_image, astronaut_image, output_type="latent").images
    pipe.unet.set_attn_processor(AttnProcessor())  # the classic (non-fused) processor
    before = processor_state(pipe.unet)
    out = run(pipe, cat_image, astronaut_image, output_type="latent").images
    assert processor_state(pipe.unet) == before
    assert torch.allclose(out, reference, atol=1e-4)


def test_non_square_sizes_and_aspect_crop(tiny_pipe, cat_image, astronaut_image):
    out = run(tiny_pipe, cat_image, astronaut_image, height=64, width=128, output_type="np")
    assert out.images.shape == (1, 64, 128, 3)
    assert out.appearance_inversion.latents.shape == (1, 4, 8, 16)


def test_array_and_tensor_inputs(tiny_pipe, cat_image, astronaut_image):
    from_pil = run(tiny_pipe, cat_image, astronaut_image, output_type="latent").images
    from_uint8 = run(tiny_pipe, np.asarray(cat_image), np.asarray(astronaut_image), output_type="latent").images
    assert torch.equal(from_pil, from_uint8)
    as_float = np.asarray(cat_image).astype(np.float32) / 255
    tensor = torch.from_numpy(np.asarray(astronaut_image).astype(np.float32) / 255).permute(2, 0, 1)
    out = run(tiny_pipe, as_float, tensor, output_type="latent").images
    assert torch.isfinite(out).all() and torch.allclose(out, from_pil, atol=0.1)


def test_bfloat16_runs_without_dtype_errors(cat_image, astronaut_image):
    pipe = build_tiny_pipeline().to(torch.bfloat16)
    out = run(pipe, cat_image, astronaut_image, output_type="np", return_reconstructions=True)
    assert np.isfinite(out.images).all()
    assert out.appearance_inversion.latents.dtype == torch.float32  # latents are kept in float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload needs an accelerator")
def test_model_cpu_offload(cat_image, astronaut_image):
    pipe = build_tiny_pipeline()
    reference = run(pipe.to("cuda"), cat_image, astronaut_image, output_type="latent").images
    pipe = build_tiny_pipeline()
    pipe.enable_model_cpu_offload()
    out = run(pipe, cat_image, astronaut_image, output_type="latent").images
    assert torch.allclose(out.cpu(), reference.cpu(), atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 runs need an accelerator")
def test_float16_on_cuda_is_close_to_float32(cat_image, astronaut_image):
    reference = run(build_tiny_pipeline().to("cuda"), cat_image, astronaut_image, output_type="latent").images
    pipe = build_tiny_pipeline().to("cuda", torch.float16)
    out = run(pipe, cat_image, astronaut_image, output_type="latent").images
    assert torch.isfinite(out).all() and (out - reference).abs().max() < 0.1
