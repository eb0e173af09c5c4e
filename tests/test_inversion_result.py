"""Unit tests of `inversion.py`: the `InversionResult` container and the edit-friendly DDPM math."""

import json
import math
import struct

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import TINY_SD

from cross_image_attention.inversion import (
    InversionResult,
    ddpm_coefficients,
    ddpm_step,
    extract_noise_map,
    sample_noisy_trajectory,
)


def _result(batch=2, steps=3, seed=0, **metadata):
    generator = torch.Generator().manual_seed(seed)
    return InversionResult(
        latents=torch.randn(batch, 4, 5, 6, generator=generator),
        noise=torch.randn(batch, steps, 4, 5, 6, generator=generator),
        timesteps=torch.arange(steps, 0, -1) * 10 + 1,
        **metadata,
    )


FULL_METADATA = {
    "prompt": "A photo of a zebra, ünïcödé",
    "num_inference_steps": 10,
    "skip_steps": 7,
    "guidance_scale": 3.5,
    "height": 40,
    "width": 48,
    "reference_freeu": True,
}


@pytest.fixture
def scheduler():
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(TINY_SD / "scheduler"))
    scheduler.set_timesteps(20)
    return scheduler


# ---------------------------------------------------------------------------------------------------------------
# InversionResult: construction and validation
# ---------------------------------------------------------------------------------------------------------------


def test_construction_with_only_tensors():
    result = _result()
    assert result.batch_size == 2
    assert result.metadata() == {name: None for name in FULL_METADATA}


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("latents", {"latents": torch.zeros(4, 5, 6)}),
        ("noise", {"noise": torch.zeros(2, 3, 4, 5)}),
        ("noise", {"noise": torch.zeros(1, 3, 4, 5, 6)}),  # batch mismatch
        ("noise", {"noise": torch.zeros(2, 3, 4, 5, 7)}),  # map shape mismatch
        ("timesteps", {"timesteps": torch.arange(4)}),  # count mismatch
        ("timesteps", {"timesteps": torch.zeros(3, 1)}),
    ],
)
def test_shape_validation_names_the_field(field, kwargs):
    valid = {"latents": torch.zeros(2, 4, 5, 6), "noise": torch.zeros(2, 3, 4, 5, 6), "timesteps": torch.arange(3)}
    valid.update(kwargs)
    with pytest.raises(ValueError, match=field):
        InversionResult(**valid)


@pytest.mark.parametrize("field", ["latents", "noise", "timesteps"])
def test_type_validation_names_the_field(field):
    valid = {"latents": torch.zeros(2, 4, 5, 6), "noise": torch.zeros(2, 3, 4, 5, 6), "timesteps": torch.arange(3)}
    valid[field] = valid[field].tolist()
    with pytest.raises(TypeError, match=field):
        InversionResult(**valid)


# ---------------------------------------------------------------------------------------------------------------
# InversionResult: save and load
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [FULL_METADATA, {}])
def test_save_load_round_trip(tmp_path, metadata):
    result = _result(**metadata)
    path = tmp_path / "inversion.safetensors"
    result.save(path)
    loaded = InversionResult.load(path)
    for name in ("latents", "noise", "timesteps"):
        assert torch.equal(getattr(loaded, name), getattr(result, name))
        assert getattr(loaded, name).dtype == getattr(result, name).dtype
    assert loaded.metadata() == result.metadata()
    if metadata:
        assert isinstance(loaded.guidance_scale, float) and isinstance(loaded.height, int)


def test_saved_file_is_safetensors_with_header_metadata(tmp_path):
    path = tmp_path / "inversion.safetensors"
    _result(**FULL_METADATA).save(path)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        assert set(handle.keys()) == {"latents", "noise", "timesteps"}
    assert header["format"] == "cross-image-attention-inversion"
    assert header["format_version"] == "1"
    assert {name: json.loads(header[name]) for name in FULL_METADATA} == FULL_METADATA
    # The file starts with a little-endian header length followed by JSON: no pickle anywhere.
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8 : 8 + header_length])["__metadata__"]["format"] == "cross-image-attention-inversion"


def test_load_rejects_other_safetensors_files(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an InversionResult"):
        InversionResult.load(path)


def test_load_rejects_files_missing_tensors(tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file({"latents": torch.zeros(1, 4, 2, 2)}, str(path), metadata={"format": "cross-image-attention-inversion"})
    with pytest.raises(ValueError, match="noise"):
        InversionResult.load(path)


def test_load_rejects_other_format_versions(tmp_path):
    path = tmp_path / "future.safetensors"
    result = _result()
    save_file(
        {"latents": result.latents, "noise": result.noise, "timesteps": result.timesteps},
        str(path),
        metadata={"format": "cross-image-attention-inversion", "format_version": "99"},
    )
    with pytest.raises(ValueError, match="version"):
        InversionResult.load(path)


@pytest.mark.parametrize(
    "content",
    [
        b"garbage" * 10,  # header length far beyond the file
        b"",  # empty
        struct.pack("<Q", 10) + b"{notjson}!",  # a header that is not JSON
    ],
    ids=["garbage", "empty", "bad-header"],
)
def test_load_rejects_garbage_files_with_value_error(tmp_path, content):
    # safetensors raises its own SafetensorError (an Exception only) for these; load must turn it into ValueError.
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        InversionResult.load(path)


def test_load_missing_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError):
        InversionResult.load(tmp_path / "does-not-exist.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# InversionResult: to, select, cat
# ---------------------------------------------------------------------------------------------------------------


def test_to_half_keeps_integer_timesteps():
    result = _result(**FULL_METADATA)
    half = result.to(torch.float16)
    assert half.latents.dtype == torch.float16 and half.noise.dtype == torch.float16
    assert half.timesteps.dtype == result.timesteps.dtype == torch.int64
    assert torch.equal(half.timesteps, result.timesteps)
    torch.testing.assert_close(half.latents.float(), result.latents, atol=1e-2, rtol=1e-2)
    assert half.metadata() == result.metadata()
    both = result.to("cpu", torch.bfloat16)
    assert both.latents.dtype == torch.bfloat16 and both.timesteps.dtype == torch.int64


def test_select_reorders_the_batch():
    result = _result(batch=3, **FULL_METADATA)
    picked = result.select([2, 0])
    assert torch.equal(picked.latents, result.latents[[2, 0]])
    assert torch.equal(picked.noise, result.noise[[2, 0]])
    assert torch.equal(picked.timesteps, result.timesteps)
    assert picked.metadata() == result.metadata()
    assert picked.batch_size == 2


def test_cat_concatenates_and_keeps_the_first_metadata():
    first = _result(batch=1, seed=1, **FULL_METADATA)
    second = _result(batch=2, seed=2, prompt="other")
    joined = InversionResult.cat([first, second])
    assert joined.batch_size == 3
    assert torch.equal(joined.latents, torch.cat([first.latents, second.latents]))
    assert torch.equal(joined.noise, torch.cat([first.noise, second.noise]))
    assert torch.equal(joined.timesteps, first.timesteps)
    assert joined.metadata() == first.metadata()
    # select undoes cat
    assert torch.equal(joined.select([1, 2]).noise, second.noise)


def test_cat_rejects_different_timesteps():
    first = _result(batch=1)
    other = InversionResult(first.latents, first.noise, first.timesteps + 1)
    with pytest.raises(ValueError, match="timesteps"):
        InversionResult.cat([first, other])


# ---------------------------------------------------------------------------------------------------------------
# DDPM math
# ---------------------------------------------------------------------------------------------------------------


def test_schedule_of_the_tiny_scheduler(scheduler):
    assert scheduler.timesteps.tolist() == list(range(951, 0, -50))
    assert scheduler.config.set_alpha_to_one is False


@pytest.mark.parametrize("timestep", [951, 501, 51, 1])
def test_ddpm_coefficients_hand_formulas(scheduler, timestep):
    coeffs = ddpm_coefficients(scheduler, timestep)
    ab = scheduler.alphas_cumprod
    prev = timestep - 50
    ab_prev = ab[prev] if prev >= 0 else ab[0]
    assert coeffs.alpha_prod_t.ndim == 0 and coeffs.alpha_prod_t.dtype == torch.float32
    assert coeffs.alpha_prod_t.item() == ab[timestep].item()
    assert coeffs.alpha_prod_t_prev.item() == ab_prev.item()
    # The reference's float32 operations, number for number.
    expected_variance = ((1 - ab_prev) / (1 - ab[timestep])) * (1 - ab[timestep] / ab_prev)
    assert coeffs.variance.dtype == torch.float32
    assert coeffs.variance.item() == expected_variance.item()
    # Close to the exact value (float32 cancellation at small t costs a few 1e-5 relative).
    a_t, a_p = float(ab[timestep]), float(ab_prev)
    assert coeffs.variance.item() == pytest.approx((1 - a_p) / (1 - a_t) * (1 - a_t / a_p), rel=1e-4)
    # Same as the scheduler's own eta = 1 variance.
    assert coeffs.variance.item() == pytest.approx(float(scheduler._get_variance(timestep, prev)), rel=1e-5)


def test_ddpm_coefficients_final_step_uses_the_first_alpha(scheduler):
    coeffs = ddpm_coefficients(scheduler, 1)
    assert coeffs.alpha_prod_t_prev.item() == scheduler.alphas_cumprod[0].item()
    assert coeffs.alpha_prod_t_prev.item() != 1.0
    # Accepts a tensor timestep too.
    assert ddpm_coefficients(scheduler, torch.tensor(1)).variance.item() == coeffs.variance.item()


def test_sample_noisy_trajectory_draw_order(scheduler):
    timesteps = scheduler.timesteps
    clean = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(42)
    calls = []

    def draw():
        calls.append(len(calls))
        return torch.randn(clean.shape, generator=generator)

    trajectory = sample_noisy_trajectory(clean, scheduler, timesteps, draw)
    assert len(calls) == len(timesteps) == 20
    assert len(trajectory) == 21
    assert torch.equal(trajectory[-1], clean)

    replay = torch.Generator().manual_seed(42)
    draws = [torch.randn(clean.shape, generator=replay) for _ in range(20)]
    ab = scheduler.alphas_cumprod
    for index, t in enumerate(timesteps.tolist()):
        # The last timestep index (t = 1, least noisy) uses the first draw, index 0 (t = 951) the last.
        noise = draws[19 - index]
        expected = clean * math.sqrt(float(ab[t])) + noise * math.sqrt(1 - float(ab[t]))
        torch.testing.assert_close(trajectory[index], expected, atol=1e-6, rtol=1e-6)
    # The first draw is not used for the noisiest entry.
    assert not torch.allclose(trajectory[0], clean * ab[951] ** 0.5 + draws[0] * (1 - ab[951]) ** 0.5)


@pytest.mark.parametrize("timestep", [951, 501, 51, 1])
def test_extract_noise_map_then_ddpm_step_reproduces_the_less_noisy_sample(scheduler, timestep):
    generator = torch.Generator().manual_seed(timestep)
    sample = torch.randn(2, 4, 5, 5, generator=generator)
    less_noisy = torch.randn(2, 4, 5, 5, generator=generator)
    noise_pred = torch.randn(2, 4, 5, 5, generator=generator)
    coeffs = ddpm_coefficients(scheduler, timestep)
    noise, recomputed = extract_noise_map(sample, less_noisy, noise_pred, coeffs)
    torch.testing.assert_close(recomputed, less_noisy, atol=1e-5, rtol=1e-5)
    stepped = ddpm_step(sample, noise_pred, noise, coeffs)
    torch.testing.assert_close(stepped, recomputed, atol=1e-6, rtol=1e-6)

    # Hand formula of the posterior mean and the noise map.
    a_t, a_p, var = float(coeffs.alpha_prod_t), float(coeffs.alpha_prod_t_prev), float(coeffs.variance)
    x0_hat = (sample.double() - math.sqrt(1 - a_t) * noise_pred.double()) / math.sqrt(a_t)
    mean = math.sqrt(a_p) * x0_hat + math.sqrt(1 - a_p - var) * noise_pred.double()
    expected_noise = (less_noisy.double() - mean) / math.sqrt(var)
    torch.testing.assert_close(noise.double(), expected_noise, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(
        ddpm_step(sample, noise_pred, torch.zeros_like(noise), coeffs).double(), mean, atol=1e-5, rtol=1e-5
    )
