"""Free-Prompt-Editing at small sizes: the plan, the replacement against an explicit computation, inversion, the
inversion file, outputs, inputs, callbacks, forward counts and bad input. Parity: test_prompt_editing_parity.py."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers.callbacks import PipelineCallback
from safetensors.torch import save_file
from tiny_models import build_tiny_components, load_input

from cross_image_attention.ddim_inversion import (
    ddim_invert,
    ddim_update,
    denoising_alphas,
    inversion_alphas,
)
from cross_image_attention.pipeline_prompt_editing import (
    DDIMInversionResult,
    FreePromptEditingPipeline,
    FreePromptEditingPipelineOutput,
    plan_edit_steps,
    replace_window,
)

# The authors' notebooks build this DDIM scheduler (steps_offset=0, rewritten to 1 by the pipeline).
NOTEBOOK_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
}
SMALL = {"height": 64, "width": 64, "num_inference_steps": 3}  # maps replaced at steps 0 and 1
SOURCE, TARGET = "a photo of a cat", "a photo of a tiger"
CAT = PIL.Image.new("RGB", (80, 64), (200, 120, 40))


def build_fpe_pipeline(**components) -> FreePromptEditingPipeline:
    """The fixture's tiny model with the notebook's DDIM scheduler."""
    parts = {**build_tiny_components(), "scheduler": DDIMScheduler(**NOTEBOOK_SCHEDULER), **components}
    pipe = FreePromptEditingPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_sample_forwards(pipe, call, outputs: bool = False) -> list:
    """Run ``call()``; the batch size of every UNet call, or (``outputs=True``) its output."""
    recorded = []

    def hook(module, args, kwargs, output):
        recorded.append(output.sample.clone() if outputs else (args[0] if args else kwargs["sample"]).shape[0])

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return recorded


def record_unet_inputs(pipe, call) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``call()``; the ``(sample, encoder_hidden_states)`` of every UNet call."""
    recorded = []

    def hook(module, args, kwargs):
        recorded.append((args[0] if args else kwargs["sample"], kwargs["encoder_hidden_states"]))

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return recorded


@pytest.fixture(scope="module")
def pipe():
    return build_fpe_pipeline()


@pytest.fixture(scope="module")
def cat():
    return load_input("chelsea")


@pytest.fixture(scope="module")
def small_inversion(pipe, cat):
    return pipe.invert(cat, prompt=SOURCE, **SMALL)


# ------------------------------------------------------------------------------------------------------------------
# Scheduler, window, plan, layers
# ------------------------------------------------------------------------------------------------------------------


def test_scheduler_becomes_ddim_with_the_reference_offset():
    notebook = DDIMScheduler(**NOTEBOOK_SCHEDULER)
    pipe = build_fpe_pipeline(scheduler=notebook)
    assert notebook.config.steps_offset == 0  # the caller's scheduler is left alone
    pipe.set_editing_timesteps(50)
    assert pipe.scheduler.timesteps.tolist() == list(range(981, 0, -20))
    assert pipe.scheduler.final_alpha_cumprod == pipe.scheduler.alphas_cumprod[0]
    pndm = {name: value for name, value in NOTEBOOK_SCHEDULER.items() if name != "clip_sample"}
    converted = build_fpe_pipeline(scheduler=PNDMScheduler(**pndm, skip_prk_steps=True))
    assert isinstance(converted.scheduler, DDIMScheduler)
    # Timesteps that are not 1000 // T apart would make the hand-written updates join the wrong noise levels.
    trailing = build_fpe_pipeline(scheduler=DDIMScheduler(**NOTEBOOK_SCHEDULER, timestep_spacing="trailing"))
    with pytest.raises(ValueError, match="timestep_spacing 'trailing'.*not 33 apart"):
        trailing.set_editing_timesteps(30)
    trailing.set_editing_timesteps(50)
    converted.scheduler = EulerDiscreteScheduler.from_config(converted.scheduler.config)
    with pytest.raises(ValueError, match="scheduler.*EulerDiscreteScheduler.*DDIMScheduler"):
        converted(TARGET, CAT, **SMALL)


def test_replace_window_truncates_like_the_reference():
    assert replace_window(50, 0.8) == range(0, 40)
    assert replace_window(12, 0.8) == range(0, 9)  # int(9.6)
    assert replace_window(10, (0.25, 0.75)) == range(2, 7)
    assert replace_window(10, 1) == range(0, 10) and replace_window(10, 0.0) == range(0, 0)
    for bad, error in ((1.5, ValueError), ((0.6, 0.2), ValueError), ("0.8", TypeError), ((0.1, 0.2, 0.3), TypeError)):
        with pytest.raises(error, match="self_replace_steps"):
            replace_window(10, bad)


def rows_per_step(plan, num_targets=1):
    return [step.row_groups(num_targets).total for step in plan]


def test_plan_runs_only_the_rows_that_change_the_result():
    window = replace_window(50, 0.8)
    real = {"teacher_forced": True, "keep_source": False, "source_every_step": False, "guided": True}
    # Default real-image edit (empty source prompt): [u_tgt, c_src, c_tgt] in the window, [u_tgt, c_tgt] after it.
    plan = plan_edit_steps(50, window, **real, source_rows_identical=True)
    assert rows_per_step(plan) == [3] * 40 + [2] * 10
    assert [step.replace_maps for step in plan] == [True] * 40 + [False] * 10
    assert not any(step.update_source for step in plan)
    assert plan[0].row_groups(2).names == ["uncond/target", "cond/source", "cond/target"]
    # A kept source is one DDIM step from the inversion: only the last step needs its update.
    kept = plan_edit_steps(50, window, **{**real, "keep_source": True}, source_rows_identical=False)
    assert rows_per_step(kept) == [3] * 40 + [2] * 9 + [4]
    assert kept[-1].row_groups(1).names == ["uncond/source", "uncond/target", "cond/source", "cond/target"]
    # A generated image's source runs freely until the window's last step, which only needs its maps.
    free = plan_edit_steps(50, window, **{**real, "teacher_forced": False}, source_rows_identical=False)
    assert rows_per_step(free) == [4] * 39 + [3] + [2] * 10
    unguided = plan_edit_steps(10, range(0, 8), **{**real, "guided": False}, source_rows_identical=False)
    assert rows_per_step(unguided) == [2] * 8 + [1] * 2


def test_replaced_layers_follow_the_query_token_count(pipe):
    self_attention = [name for name in pipe.unet.attn_processors if ".attn1." in name]
    at_512 = pipe.replaced_layers(512, 512, 1024)
    assert len(self_attention) == 10 and len(at_512) == 7  # all but the 64x64-token layers
    assert not any(name.startswith(("down_blocks.0.", "up_blocks.3.")) for name in at_512)
    assert sorted(pipe.replaced_layers(256, 256, 1024)) == sorted(self_attention)  # absolute: moves with the size
    assert pipe.replaced_layers(512, 512, 0) == []


# ------------------------------------------------------------------------------------------------------------------
# The replacement against the reference's explicit attention
# ------------------------------------------------------------------------------------------------------------------


class ExplicitFPEAttention:
    """The reference's attention in float64 (REFERENCE-FPE 9.1-9.4): explicit ``softmax((q k^T) * d^-0.5)`` in every
    layer; in self-attention layers with at most ``max_tokens`` queries the conditional half's target rows take the
    conditional source row's probabilities."""

    def __init__(self, max_tokens: int, replace: bool):
        self.max_tokens, self.replace = max_tokens, replace

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        def linear(layer, states):
            bias = None if layer.bias is None else layer.bias.double()
            return F.linear(states.double(), layer.weight.double(), bias)

        def heads(states):  # [B, N, heads * d] -> [B, heads, N, d]
            return states.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        query, key, value = (
            heads(linear(layer, x))
            for layer, x in ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context))
        )
        probabilities = ((query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5).softmax(dim=-1)
        if self.replace and encoder_hidden_states is None and query.shape[2] <= self.max_tokens:
            half = probabilities.shape[0] // 2  # [u_src, u_tgt..., c_src, c_tgt...]: the conditional half only
            probabilities[half + 1 :] = probabilities[half]
        return linear(attn.to_out[0], (probabilities @ value).transpose(1, 2).flatten(2)).float()


def test_map_replacement_matches_explicit_float64_attention(pipe):
    """Two steps of a generated-image edit at 128 px (16x16 latents), replacing the layers with <= 64 tokens, against
    the same steps with the reference's explicit attention in float64 in every layer."""
    max_tokens, guidance, steps = 64, 7.5, 2
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = pipe(
        TARGET,
        source_prompt=SOURCE,
        latents=start,
        num_inference_steps=steps,
        self_replace_steps=1.0,
        self_replace_max_tokens=max_tokens,
        output_type="latent",
        return_source=True,
    )
    with torch.no_grad():
        embeddings = pipe.encode_text(["", "", SOURCE, TARGET], "cpu")
    original = pipe.unet.attn_processors

    def explicit_edit(replace: bool) -> torch.Tensor:
        pipe.unet.set_attn_processor(ExplicitFPEAttention(max_tokens, replace))
        try:
            latents = start.expand(2, -1, -1, -1)  # [source, target]
            for t in pipe.scheduler.timesteps:
                with torch.no_grad():
                    noise = pipe.unet(torch.cat([latents, latents]), t, encoder_hidden_states=embeddings).sample
                uncond, cond = noise.chunk(2)
                latents = ddim_update(
                    latents, uncond + guidance * (cond - uncond), *denoising_alphas(pipe.scheduler, t)
                )
            return latents
        finally:
            pipe.unet.set_attn_processor(dict(original))

    reference, unedited = explicit_edit(replace=True), explicit_edit(replace=False)
    result = torch.cat([out.source_images, out.images])
    assert (result - reference).abs().max() < 1e-4 * reference.abs().max()
    # The replacement matters at this size: without it the target is far off, the source unchanged.
    assert (reference[1] - unedited[1]).abs().max() > 100 * (result - reference).abs().max()
    assert torch.allclose(reference[0], unedited[0])


# ------------------------------------------------------------------------------------------------------------------
# Inversion
# ------------------------------------------------------------------------------------------------------------------


def test_inversion_round_trip_with_the_same_noise_predictions(pipe, cat):
    """Denoising with the noise predictions the inversion made retraces it to float rounding: both directions join
    the same pairs of noise levels (including the clean latent at alphas_cumprod[0])."""
    pipe.set_editing_timesteps(10)
    clean = pipe.encode_images(pipe.preprocess_image(cat, "image", 64, 64, "crop"))
    cond = pipe.encode_text([SOURCE], "cpu")
    recorded = []

    def predict(latents, t):
        recorded.append(pipe.predict_noise(latents, t, cond))
        return recorded[-1]

    with torch.no_grad():
        trajectory = ddim_invert(clean, pipe.scheduler, predict)
    assert trajectory.shape == (1, 11, 4, 8, 8)
    latents = trajectory[:, -1]
    for i, t in enumerate(pipe.scheduler.timesteps):
        latents = ddim_update(latents, recorded[9 - i], *denoising_alphas(pipe.scheduler, t))
        assert (latents - trajectory[:, 9 - i]).abs().max() < 1e-4 * trajectory.abs().max(), i
    assert (trajectory[:, -1] - clean).abs().max() > 0.1  # the trajectory did move away from the image
    first = inversion_alphas(pipe.scheduler, 1)
    assert first[0] == pipe.scheduler.final_alpha_cumprod and first[1] == pipe.scheduler.alphas_cumprod[1]


def test_real_edit_teacher_forces_the_source(pipe, cat, small_inversion):
    """Each step's source rows get the inversion latent at that step; the target starts from the inverted latent
    and then runs on its own."""
    inputs = record_unet_inputs(pipe, lambda: pipe(TARGET, inversion=small_inversion, source_prompt=SOURCE, **SMALL))
    trajectory = small_inversion.latents[0]
    for i, (sample, _) in enumerate(inputs[:2]):  # window steps: [u_tgt, c_src, c_tgt]
        assert sample.shape[0] == 3 and torch.equal(sample[1], trajectory[3 - i])
    assert torch.equal(inputs[0][0][0], trajectory[3]) and not torch.equal(inputs[1][0][0], trajectory[2])
    assert inputs[2][0].shape[0] == 2  # after the window the source is not computed
    # The edit inverts the image itself in the same way when given the image.
    direct = pipe(TARGET, cat, source_prompt=SOURCE, output_type="latent", **SMALL)
    assert torch.equal(direct.inversion.latents, small_inversion.latents)


def test_inversion_with_empty_prompt_runs_one_row(pipe, cat):
    calls = count_sample_forwards(pipe, lambda: pipe.invert(cat, **SMALL))
    assert calls == [1] * 3  # "" as uncond and cond: the same input, guidance is the identity
    assert count_sample_forwards(pipe, lambda: pipe.invert(cat, prompt=SOURCE, **SMALL)) == [2] * 3
    assert count_sample_forwards(pipe, lambda: pipe.invert(cat, prompt=SOURCE, guidance_scale=1.0, **SMALL)) == [1] * 3


def test_null_text_inversion_lowers_the_guided_reconstruction_error(pipe, cat):
    settings = SMALL
    inversion = pipe.invert(cat, prompt=SOURCE, null_text=True, null_text_inner_steps=3, **settings)
    embeddings = inversion.null_text_embeddings
    assert embeddings.shape == (1, 3, 77, 32) and inversion.guidance_scale == 7.5
    assert not any(p.grad is not None for p in pipe.unet.parameters())  # no gradients left on the model
    # Step 0 from the start latent with guidance 7.5 lands closer to the next inversion latent with the optimised
    # embedding than with the empty prompt's.
    latents, target, t = inversion.latents[:, 3], inversion.latents[:, 2], pipe.scheduler.timesteps[0]
    cond = pipe.encode_text([SOURCE], "cpu")

    def error(uncond):
        with torch.no_grad():
            noise_uncond, noise_cond = pipe.predict_noise(
                torch.cat([latents] * 2), t, torch.cat([uncond, cond])
            ).chunk(2)
            step = ddim_update(
                latents, noise_uncond + 7.5 * (noise_cond - noise_uncond), *denoising_alphas(pipe.scheduler, t)
            )
        return F.mse_loss(step, target).item()

    assert error(embeddings[0, :1]) < error(pipe.encode_text([""], "cpu"))
    # The edit uses the optimised embedding of each step in every unconditional row.
    inputs = record_unet_inputs(pipe, lambda: pipe(TARGET, inversion=inversion, source_prompt=SOURCE, **settings))
    for i, (_, states) in enumerate(inputs):
        assert torch.equal(states[0], embeddings[0, i])


def test_inversion_result_validation_and_file_round_trip(small_inversion, tmp_path):
    bare = DDIMInversionResult(latents=small_inversion.latents[0], timesteps=small_inversion.timesteps.tolist())
    assert bare.latents.shape == (1, 4, 4, 8, 8) and bare.prompt is None and bare.num_inference_steps == 3
    settings = {"prompt": "a cat", "guidance_scale": 7.5, "height": 64, "width": 64}
    embeddings = torch.randn(1, 3, 77, 32)
    with_text = DDIMInversionResult(
        small_inversion.latents, small_inversion.timesteps, **settings, null_text_embeddings=embeddings
    )
    path = tmp_path / "inversion.safetensors"
    with_text.save(path)
    loaded = DDIMInversionResult.load(path)
    assert torch.equal(loaded.latents, with_text.latents) and torch.equal(loaded.timesteps, with_text.timesteps)
    assert torch.equal(loaded.null_text_embeddings, with_text.null_text_embeddings)
    assert loaded.metadata() == settings
    bare.save(path)
    assert DDIMInversionResult.load(path).null_text_embeddings is None
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="Cannot read a DDIMInversionResult"):
        DDIMInversionResult.load(tmp_path / "pickle.pt")
    save_file({"latents": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a DDIMInversionResult file"):
        DDIMInversionResult.load(tmp_path / "other.safetensors")
    bad = small_inversion.latents.clone()
    bad[0, 3, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="latents holds non-finite values"):
        DDIMInversionResult(bad, small_inversion.timesteps)
    with pytest.raises(ValueError, match="timesteps must be \\[T\\] = \\[3\\]"):
        DDIMInversionResult(small_inversion.latents, small_inversion.timesteps[:2])
    with pytest.raises(ValueError, match="null_text_embeddings"):
        DDIMInversionResult(
            small_inversion.latents, small_inversion.timesteps, null_text_embeddings=torch.zeros(1, 2, 77, 32)
        )
    assert torch.equal(small_inversion.select([0, 0]).latents[1], small_inversion.latents[0])


# ------------------------------------------------------------------------------------------------------------------
# Calls: outputs, inputs, batching, callbacks, forward counts
# ------------------------------------------------------------------------------------------------------------------


def test_output_types_agree(pipe, small_inversion):
    def run(output_type, **kwargs):
        return pipe(
            TARGET, inversion=small_inversion, source_prompt=SOURCE, output_type=output_type, **SMALL, **kwargs
        )

    outputs = {kind: run(kind, return_source=True) for kind in ("pil", "np", "pt", "latent")}
    assert isinstance(outputs["pil"], FreePromptEditingPipelineOutput)
    assert outputs["pil"].images[0].size == (64, 64) and len(outputs["pil"].source_images) == 1
    np_images, pt_images = outputs["np"].images, outputs["pt"].images
    assert np_images.shape == (1, 64, 64, 3) and pt_images.shape == (1, 3, 64, 64)
    assert np.allclose(np_images, pt_images.permute(0, 2, 3, 1).numpy())
    # PIL images round as the reference's torchvision save_image: floor(255 x + 0.5).
    assert np.array_equal(np.asarray(outputs["pil"].images[0]), np.floor(np_images[0] * 255 + 0.5).astype(np.uint8))
    latents = outputs["latent"]
    assert latents.images.shape == latents.source_images.shape == (1, 4, 8, 8)
    decoded = pipe.vae.decode((1 / 0.18215) * torch.cat([latents.source_images, latents.images])).sample
    assert torch.allclose((decoded / 2 + 0.5).clamp(0, 1), torch.cat([outputs["pt"].source_images, pt_images]))
    assert latents.inversion is small_inversion
    images, source_images, inversion = run("latent", return_source=True, return_dict=False)
    assert torch.equal(images, latents.images) and torch.equal(source_images, latents.source_images)
    assert inversion is small_inversion
    # Without return_source the last step runs fewer rows; the edit agrees to rounding.
    plain = run("latent")
    assert plain.source_images is None and torch.allclose(plain.images, latents.images, atol=1e-5)


def test_image_forms_give_the_same_edit(pipe, cat):
    array = np.array(cat.crop((75, 0, 375, 300)).resize((64, 64), PIL.Image.BICUBIC))
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    results = [
        pipe.invert(image, prompt=SOURCE, **SMALL).latents
        for image in (cat, array, array / 255.0, tensor, tensor[None], tensor * 2 - 1, [cat])
    ]
    for result in results[1:]:
        assert torch.allclose(result, results[0], atol=1e-5)
    stretched = pipe.invert(cat, prompt=SOURCE, resize_mode="stretch", **SMALL).latents
    assert not torch.allclose(stretched, results[0], atol=1e-2)


def test_several_prompts_share_the_source_rows(pipe, small_inversion):
    prompts = [TARGET, "a photo of a dog"]
    calls = count_sample_forwards(
        pipe,
        lambda: pipe(prompts, inversion=small_inversion, source_prompt=SOURCE, output_type="latent", **SMALL),
    )
    assert calls == [5] * 2 + [4]  # [u_tgt x2, c_src, c_tgt x2], then [u_tgt x2, c_tgt x2]
    together = pipe(prompts, inversion=small_inversion, source_prompt=SOURCE, output_type="latent", **SMALL).images
    for index, prompt in enumerate(prompts):
        alone = pipe(prompt, inversion=small_inversion, source_prompt=SOURCE, output_type="latent", **SMALL).images
        assert torch.allclose(together[index], alone[0], atol=1e-4)


def test_generated_image_flow_is_seeded(pipe):
    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return pipe(
            TARGET, source_prompt=SOURCE, generator=generator, output_type="latent", return_source=True, **SMALL
        )

    first, again, other = run(42), run(42), run(43)
    assert torch.equal(first.images, again.images) and first.inversion is None
    assert not torch.allclose(first.images, other.images)
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))  # the reference's start code
    given = pipe(TARGET, source_prompt=SOURCE, latents=start, output_type="latent", return_source=True, **SMALL)
    assert torch.equal(given.images, first.images) and torch.equal(given.source_images, first.source_images)
    # The reference passes the start code expanded to [source, target]; one start per branch is accepted too.
    expanded = pipe(TARGET, source_prompt=SOURCE, latents=start.expand(2, -1, -1, -1), output_type="latent", **SMALL)
    assert torch.equal(
        expanded.images, pipe(TARGET, source_prompt=SOURCE, latents=start, output_type="latent", **SMALL).images
    )
    # Without replacement the source is a plain sample of the source prompt: the target of the same prompt equals it.
    same = pipe(SOURCE, source_prompt=SOURCE, latents=start, output_type="latent", return_source=True, **SMALL)
    assert torch.allclose(same.images, same.source_images, atol=1e-5)


class ZeroLatentsAtTheLastStep(PipelineCallback):
    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == pipeline.num_timesteps - 1:
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return callback_kwargs


def test_callbacks_see_the_steps_and_can_replace_latents(pipe, small_inversion):
    seen = []

    def record(pipeline, step, timestep, tensors):
        seen.append((step, int(timestep), sorted(tensors), pipeline.guidance_scale, pipeline.num_timesteps))
        return {}

    call = {"inversion": small_inversion, "source_prompt": SOURCE, "output_type": "latent", **SMALL}
    pipe(TARGET, callback_on_step_end=record, **call)
    assert [s[0] for s in seen] == list(range(3)) and [s[1] for s in seen] == [667, 334, 1]
    assert all(s[2:] == (["latents"], 7.5, 3) for s in seen)
    # The callback sees [source, target] after each step, so the source runs at every step.
    calls = count_sample_forwards(pipe, lambda: pipe([TARGET, "a dog"], callback_on_step_end=record, **call))
    assert calls == [6] * 3  # [u_src, u_tgt x2, c_src, c_tgt x2]
    assert torch.count_nonzero(pipe(TARGET, callback_on_step_end=ZeroLatentsAtTheLastStep(), **call).images) == 0

    def interrupt(pipeline, step, timestep, tensors):
        pipeline._interrupt = step == 1
        return {}

    calls = count_sample_forwards(pipe, lambda: pipe(TARGET, callback_on_step_end=interrupt, **call))
    assert len(calls) == 2 and pipe.interrupt


def test_processors_are_restored_after_a_call_and_after_an_error(pipe, small_inversion):
    before = {name: id(processor) for name, processor in pipe.unet.attn_processors.items()}

    def fail(pipeline, step, timestep, tensors):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe(TARGET, inversion=small_inversion, source_prompt=SOURCE, callback_on_step_end=fail, **SMALL)
    assert {name: id(processor) for name, processor in pipe.unet.attn_processors.items()} == before


def test_forward_count_of_a_default_real_image_edit(pipe, cat):
    """The reference spends 50 x 2 sample-forwards on inversion and 50 x 4 on editing: 300. Here: the empty source
    prompt's identical rows run once (inversion 50 x 1), the source runs only for its maps in the 40 replaced steps
    and the unconditional source never: 40 x 3 + 10 x 2."""
    calls = count_sample_forwards(pipe, lambda: pipe(TARGET, cat, height=64, width=64, output_type="latent"))
    assert calls == [1] * 50 + [3] * 40 + [2] * 10
    assert sum(calls) == 190 < 300


def test_forward_count_of_a_generated_image_edit(pipe):
    """Reference: 4 rows per step. Here the source stops after the window (T=10, 0.8: steps 0..7)."""
    call = {"prompt": TARGET, "source_prompt": SOURCE, "output_type": "latent", "height": 64, "width": 64}
    calls = count_sample_forwards(pipe, lambda: pipe(**call, num_inference_steps=10))
    assert calls == [4] * 7 + [3] + [2] * 2 and sum(calls) == 35 < 40
    assert count_sample_forwards(pipe, lambda: pipe(**call, num_inference_steps=10, return_source=True)) == [4] * 10


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


BAD_CALLS = [
    ({"prompt": 3}, TypeError, "prompt"),
    ({"prompt": []}, TypeError, "prompt"),
    ({"source_prompt": None}, TypeError, "source_prompt"),
    ({"negative_prompt": ["a"]}, TypeError, "negative_prompt"),
    ({"image": CAT.convert("RGBA")}, ValueError, "image.*RGB"),
    ({"image": "cat.png"}, TypeError, "image"),
    ({"image": np.full((64, 64, 3), 2.0, dtype=np.float32)}, ValueError, r"image.*\[0, 1\]"),
    ({"image": [CAT, CAT]}, ValueError, "image.*one"),
    ({"image": CAT, "resize_mode": "stretch", "height": 100}, ValueError, "height.*multiple of 64"),
    ({"resize_mode": "fit"}, ValueError, "resize_mode"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, TypeError, "num_inference_steps"),
    ({"num_inference_steps": 1001}, ValueError, "num_inference_steps"),
    ({"guidance_scale": -1.0}, ValueError, "guidance_scale"),
    ({"inversion_guidance_scale": "7.5"}, TypeError, "inversion_guidance_scale"),
    ({"self_replace_steps": 1.2}, ValueError, "self_replace_steps"),
    ({"self_replace_steps": (0.5, 0.1)}, ValueError, "self_replace_steps"),
    ({"self_replace_max_tokens": -1}, ValueError, "self_replace_max_tokens"),
    ({"self_replace_max_tokens": 32.0}, TypeError, "self_replace_max_tokens"),
    ({"width": 0}, ValueError, "width"),
    ({"output_type": "jpeg"}, ValueError, "output_type"),
    ({"generator": 42}, TypeError, "generator"),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, ValueError, "callback_on_step_end_tensor_inputs"),
    ({"callback_on_step_end": "print"}, TypeError, "callback_on_step_end"),
    ({"image": None, "latents": torch.zeros(1, 3, 8, 8)}, ValueError, "latents"),
    ({"image": None, "latents": torch.zeros(3, 4, 8, 8)}, ValueError, "latents.*source, then each target"),
    ({"image": None, "latents": torch.full((1, 4, 8, 8), math.inf)}, ValueError, "latents.*non-finite"),
    ({"latents": torch.zeros(1, 4, 8, 8)}, ValueError, "latents.*image"),
]


@pytest.fixture(scope="module")
def guarded_pipe():
    """A pipeline whose models fail when called: bad input must be refused before any of them runs."""
    pipe = build_fpe_pipeline()

    def refuse(module, args):
        raise AssertionError(f"{type(module).__name__} ran before the input was checked")

    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.register_forward_pre_hook(refuse)
    return pipe


@pytest.mark.parametrize("overrides, error, pattern", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_call_arguments_are_refused_before_any_model_call(guarded_pipe, overrides, error, pattern):
    kwargs = {"prompt": TARGET, "image": CAT, **SMALL, **overrides}
    with pytest.raises(error, match=pattern):
        guarded_pipe(**kwargs)


def test_bad_inversions_are_refused_before_any_model_call(guarded_pipe, small_inversion):
    def call(inversion, **overrides):
        guarded_pipe(TARGET, inversion=inversion, **{"source_prompt": SOURCE, **SMALL, **overrides})

    cases = [
        ({"inversion": "inversion.safetensors"}, TypeError, "inversion.*DDIMInversionResult"),
        ({"inversion": small_inversion, "image": CAT}, ValueError, "image.*inversion.*not both"),
        ({"inversion": small_inversion, "num_inference_steps": 4}, ValueError, "inversion.*timesteps.*invert"),
        ({"inversion": small_inversion, "height": 128}, ValueError, "height.*inversion"),
        ({"inversion": small_inversion, "source_prompt": ""}, ValueError, "inversion.*prompt.*source_prompt"),
        ({"inversion": small_inversion, "inversion_guidance_scale": 2.0}, ValueError, "guidance_scale"),
        ({"inversion": small_inversion.select([0, 0])}, ValueError, "inversion.*2 images"),
    ]
    for kwargs, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call(**kwargs)
    with_text = DDIMInversionResult(
        small_inversion.latents, small_inversion.timesteps, null_text_embeddings=torch.zeros(1, 3, 77, 32)
    )
    with pytest.raises(ValueError, match="negative_prompt.*null-text"):
        call(with_text, negative_prompt="blurry")
    for kwargs, error, pattern in (
        ({"image": None}, ValueError, "image"),
        ({"prompt": ["a"]}, TypeError, "prompt"),
        ({"null_text": 1}, TypeError, "null_text"),
        ({"null_text": True, "null_text_inner_steps": 0}, ValueError, "null_text_inner_steps"),
        ({"height": 65}, ValueError, "height"),
    ):
        with pytest.raises(error, match=pattern):
            guarded_pipe.invert(**{"image": CAT, **SMALL, **kwargs})
