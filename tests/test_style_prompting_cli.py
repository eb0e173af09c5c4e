"""`cross-image-attention style`, the front-end helpers and the benchmark's tiny mode."""

import importlib.util
import json
from pathlib import Path

import PIL.Image
import pytest
from diffusers import StableDiffusionXLPipeline
from test_style_prompting import build_tiny_sdxl_components, single_thread  # noqa: F401 (autouse fixture)

from cross_image_attention import cli_style
from cross_image_attention.style_prompting import PRESETS

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_xl(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sdxl_cli")
    StableDiffusionXLPipeline(**build_tiny_sdxl_components()).save_pretrained(path)
    return path


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "The starry night.png"
    PIL.Image.new("RGB", (40, 30), (20, 40, 200)).save(path)
    return path


BAD_ARGUMENTS = [
    ([], "--preset"),
    (["--preset", "nope"], "--preset"),
    (["--preset", "fire", "--num_inference_steps", "0"], "--num_inference_steps"),
    (["--preset", "fire", "--guidance_scale", "-1"], "--guidance_scale"),
    (["--preset", "fire", "--style_steps", "5,2"], "--style_steps"),
    (["--preset", "fire", "--color_calibration", "150,100"], "--color_calibration"),
    (["--preset", "fire", "--controlnet", "some/controlnet"], "--controlnet"),
    (["--preset", "fire", "--model", "/no/such/folder"], "--model"),
    (["--prompt", "a dog", "--reference_image", "unknown painting.png"], "--reference_prompt"),
    (["--prompt", "a", "--reference_prompt", "b", "--reference_image", "missing.png"], "--reference_image"),
]


@pytest.mark.parametrize(("argv", "flag"), BAD_ARGUMENTS)
def test_bad_arguments_fail_before_the_model_loads(argv, flag, monkeypatch, capsys, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli_style, "load_style_pipeline", refuse)
    assert cli_style.main([*argv, "--device", "cpu", "--output_path", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0]


def test_preset_and_real_image_exclude_each_other(image_file, monkeypatch, capsys):
    monkeypatch.setattr(cli_style, "load_style_pipeline", None)
    assert cli_style.main(["--preset", "fire", "--reference_image", str(image_file), "--device", "cpu"]) == 1
    assert "--preset" in capsys.readouterr().err


def test_list_presets(capsys):
    assert cli_style.main(["--list_presets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS)


def test_prompt_resolution():
    totoro = cli_style.style_prompts(preset="totoro", sdxl=True)
    assert totoro["style_layers"] == 16 and totoro["reference_seed"] == 42 and len(totoro["seeds"]) == 10
    assert cli_style.style_prompts(preset="totoro")["style_layers"] == 4
    fire = cli_style.style_prompts(preset="fire", target_object="A tiger", seeds=[5])
    assert fire["prompt"] == "A tiger photography, realistic, black background'" and fire["seeds"] == [5]
    assert fire["negative_prompt"] == "" and "style_layers" not in fire  # encoded, not zeros
    painting = cli_style.style_prompts(reference_image_name="The starry night.png")
    assert painting["reference_prompt"] == "The starry night of van gogh"
    assert painting["prompt"] == "cat of van gogh"  # the real-image script's default object


def test_command_writes_images_grid_and_settings(saved_xl, tmp_path, capsys):
    argv = ["--preset", "low-poly", "--model", str(saved_xl), "--seeds", "0", "1", "--num_inference_steps", "1"]
    assert cli_style.main([*argv, "--device", "cpu", "--output_path", str(tmp_path)]) == 0
    names = ["reference.png", "seed_0.png", "seed_1.png"]
    assert all((tmp_path / name).is_file() for name in names)
    assert PIL.Image.open(tmp_path / "grid.png").size == (3 * 128 + 2 * cli_style.GRID_PADDING, 128)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sdxl"] and config["reference_prompt"] == PRESETS["low-poly"].prompt("A cat")
    assert "Saved" in capsys.readouterr().out


def test_run_style_with_a_real_reference(saved_xl, image_file, monkeypatch):
    pipe = cli_style.load_style_pipeline(str(saved_xl), True, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    calls = []
    monkeypatch.setattr(pipe, "denoise", lambda request, *args: calls.append(request) or args[0])
    cli_style.run_style(pipe, preset="fire", seeds=[1, 2], num_inference_steps=1, early_guidance_scale=None)
    assert calls[0].early_guidance_scale is None and calls[0].prompts == [PRESETS["fire"].prompt("A dragon")] * 2
    monkeypatch.undo()
    images = cli_style.run_style(
        pipe,
        reference_image=PIL.Image.open(image_file).convert("RGB"),
        reference_image_name=image_file.name,
        target_object="a dog",
        seeds=[3],
        num_inference_steps=2,
    )
    assert len(images) == 2 and images[0].size == (128, 128)


def test_benchmark_tiny_mode(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "benchmark_vsp", REPO_ROOT / "benchmarks/benchmark_style_prompting.py"
    )
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    argv = ["--tiny", "--images", "1", "--num_inference_steps", "2", "--device", "cpu", "--reference_image"]
    results = benchmark.main([*argv, "--output", str(tmp_path / "results.json")])
    assert results["unet_sample_forwards"] == results["reference_unet_sample_forwards"] == 2 * 2 * 2
    assert results["vae_encodes"] == 1 and results["reference_vae_encodes"] == 2  # encoded once, sampled per step
    assert results["reference_attention_map_mib"] > 0 and results["attention_map_mib"] == 0
    assert json.loads((tmp_path / "results.json").read_text())["images"] == 1
