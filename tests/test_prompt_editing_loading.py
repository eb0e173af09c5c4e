"""Loading Free-Prompt-Editing by file path and with `from_pipe`, saving and reloading, the command line and the
benchmark."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline
from test_prompt_editing import SMALL, SOURCE, TARGET
from tiny_models import PARITY, build_tiny_components

from cross_image_attention import cli_edit
from cross_image_attention.ddim_inversion import DDIMInversionResult
from cross_image_attention.pipeline_prompt_editing import FreePromptEditingPipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILE = REPO_ROOT / "pipeline_prompt_editing.py"
START = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def edit(pipe) -> torch.Tensor:
    """A generated-image edit from fixed noise, as latents."""
    return pipe(TARGET, source_prompt=SOURCE, latents=START, output_type="latent", **SMALL).images


@pytest.fixture(scope="module")
def direct_edit(direct_pipe) -> torch.Tensor:
    return edit(direct_pipe)


@pytest.fixture(scope="module")
def direct_pipe():
    """The saved model's components built directly (its PNDM scheduler's config as DDIM)."""
    pipe = FreePromptEditingPipeline(
        **build_tiny_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_custom_pipeline_by_file_path(saved_sd_dir, direct_edit):
    pipe = DiffusionPipeline.from_pretrained(
        saved_sd_dir, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "FreePromptEditingPipeline"
    assert type(pipe).__module__.startswith("diffusers_modules")  # the copied module, not the installed package
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.steps_offset == 1
    assert torch.equal(edit(pipe), direct_edit)
    # An inversion made with the installed package's class is accepted by the loaded module's pipeline.
    latents = torch.randn(1, SMALL["num_inference_steps"] + 1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    inversion = DDIMInversionResult(latents, timesteps=[667, 334, 1])
    assert sys.modules[type(pipe).__module__].DDIMInversionResult is not DDIMInversionResult
    out = pipe(TARGET, inversion=inversion, source_prompt=SOURCE, output_type="latent", **SMALL)
    assert torch.isfinite(out.images).all() and type(out.inversion).__module__.startswith("diffusers_modules")


def test_from_pipe_reuses_components(saved_sd_dir, direct_edit):
    base = StableDiffusionPipeline.from_pretrained(saved_sd_dir, safety_checker=None)
    pipe = DiffusionPipeline.from_pipe(base, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "FreePromptEditingPipeline"
    assert pipe.unet is base.unet and pipe.vae is base.vae
    assert isinstance(base.scheduler, PNDMScheduler)  # the source pipeline is left as it was
    assert torch.equal(edit(pipe), direct_edit)


def test_save_and_reload_round_trip(direct_pipe, direct_edit, tmp_path):
    direct_pipe.save_pretrained(tmp_path)
    reloaded = FreePromptEditingPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.safety_checker is None and reloaded.scheduler.config.steps_offset == 1
    assert torch.equal(edit(reloaded), direct_edit)


# ------------------------------------------------------------------------------------------------------------------
# Command line and demo helper
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image", "cat.png"], "required: --prompt"),
        (["--prompt", "a", "--image", "missing.png"], "--image: no such file"),
        (["--prompt", "a", "--image", "x.png", "--inversion", "y.safetensors"], "--image or --inversion"),
        (["--prompt", "a", "--num_inference_steps", "0"], "--num_inference_steps"),
        (["--prompt", "a", "--guidance_scale", "nan"], "--guidance_scale"),
        (["--prompt", "a", "--self_replace_steps", "0.8", "0.2"], "--self_replace_steps"),
        (["--prompt", "a", "--self_replace_max_tokens", "-1"], "--self_replace_max_tokens"),
        (["--prompt", "a", "--height", "0"], "--height"),
        (["--prompt", "a", "--resize_mode", "fit"], "--resize_mode"),
        (["--prompt", "a", "--null_text"], "--null_text needs --image"),
        (["--prompt", "a", "--inversion", "missing.safetensors"], "--inversion: no such file"),
        (["--prompt", "a", "--model", "no/such/folder"], "--model"),
        (["--prompt", "a", "--device", "tpu9"], "--device"),
    ],
)
def test_command_line_refuses_bad_input_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_edit, "load_edit_pipeline", pytest.fail)  # nothing may load the model
    assert cli_edit.main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")
    assert message in error[0]


def test_command_line_edits_a_file_and_reuses_its_inversion(saved_sd_dir, tmp_path, capsys):
    common = ["--model", str(saved_sd_dir), "--device", "cpu", "--num_inference_steps", "3"]
    inversion_file = tmp_path / "cat.safetensors"
    image = str(PARITY / "chelsea.png")
    argv = ["--image", image, "--source_prompt", SOURCE, "--prompt", TARGET, "--height", "64", "--width", "64"]
    first = tmp_path / "first"
    assert cli_edit.main([*argv, *common, "--output_path", str(first), "--save_inversion", str(inversion_file)]) == 0
    assert (first / "edited.png").is_file() and json.loads((first / "config.json").read_text())["flow"] == "real"
    second = tmp_path / "second"
    reuse = ["--inversion", str(inversion_file), "--source_prompt", SOURCE, "--prompt", TARGET, "--save_source"]
    assert cli_edit.main([*reuse, *common, "--output_path", str(second)]) == 0
    # The same edit (return_source changes the last step's batch, so rounding may differ).
    first_pixels, second_pixels = (np.asarray(PIL.Image.open(f / "edited.png"), dtype=int) for f in (first, second))
    assert np.abs(first_pixels - second_pixels).max() <= 1
    assert (second / "source.png").is_file()
    generated = tmp_path / "generated"
    assert (
        cli_edit.main(
            ["--prompt", TARGET, "--height", "64", "--width", "64", *common, "--output_path", str(generated)]
        )
        == 0
    )
    assert json.loads((generated / "config.json").read_text())["flow"] == "generated"
    assert "error" not in capsys.readouterr().err


def test_run_edit_returns_one_image(direct_pipe):
    from tiny_models import load_input

    image = cli_edit.run_edit(direct_pipe, load_input("chelsea"), TARGET, SOURCE, **SMALL)
    assert image.size == (64, 64)
    generated = cli_edit.run_edit(direct_pipe, None, TARGET, SOURCE, seed=42, **SMALL)
    assert generated.size == (64, 64)


def test_benchmark_reports_time_memory_and_forwards(saved_sd_dir, tmp_path):
    path = REPO_ROOT / "benchmarks" / "benchmark_prompt_editing.py"
    spec = importlib.util.spec_from_file_location("benchmark_prompt_editing", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    output = tmp_path / "result.json"
    settings = ["--height", "64", "--width", "64", "--num_inference_steps", "5"]
    results = benchmark.main(["--model", str(saved_sd_dir), "--device", "cpu", "--output", str(output), *settings])
    assert json.loads(output.read_text()) == results
    assert results["inversion_s"] > 0 and results["edit_s"] > 0 and results["peak_memory_gib"] > 0
    # Empty source prompt: inversion 5 x 1 row; edit 4 x [u_tgt, c_src, c_tgt] + 1 x [u_tgt, c_tgt]. Reference: 30.
    assert results["unet_sample_forwards_inversion"] == 5 and results["unet_sample_forwards_edit"] == 14
    assert results["reference_unet_sample_forwards"] == 30
