"""The command line interface, run in-process on the tiny saved model (and once through `python -m`)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from cross_image_attention import CrossImageAttentionPipeline, InversionResult, cli
from cross_image_attention.cli import build_parser, cache_key, main

SIZE = 64
FAST = [
    "--height", str(SIZE), "--width", str(SIZE), "--num_timesteps", "6", "--skip_steps", "2",
    "--cross_attn_32_range", "1", "5", "--cross_attn_64_range", "1", "5", "--adain_range", "2", "6",
    "--device", "cpu",
]  # fmt: skip


def cli_args(model, output, *extra, app=None, struct=None, domain="animal") -> list:
    """The tiny model, fast settings and unmasked AdaIN; image paths and domain when given."""
    images = ["--app_image_path", str(app), "--struct_image_path", str(struct)] if app is not None else []
    domain = ["--domain_name", domain] if domain is not None else []
    return [
        *images, *domain, "--use_masked_adain", "false", "--model", str(model), "--output_path", str(output),
        *FAST, *extra,
    ]  # fmt: skip


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


def inversion_files(output) -> dict:
    """Role -> cache file of a run, as its config records them."""
    return {role: Path(path) for role, path in read_config(output)["inversions"].items()}


def inversion_names(output) -> dict:
    return {role: path.name for role, path in inversion_files(output).items()}


def read_config(output) -> dict:
    return json.loads((output / "config.json").read_text())


@pytest.fixture(scope="module")
def first_run(saved_sd_dir, tmp_path_factory):
    """One unmasked run on copies of the bundled pair; tests copy its outputs before changing anything."""
    root = tmp_path_factory.mktemp("cli")
    app, struct = root / "app.jpg", root / "struct.jpg"
    shutil.copy(cli.EXAMPLE_APPEARANCE, app)
    shutil.copy(cli.EXAMPLE_STRUCTURE, struct)
    output = root / "output"
    assert main(cli_args(saved_sd_dir, output, "--seed", "7", app=app, struct=struct)) == 0
    return SimpleNamespace(model=saved_sd_dir, app=app, struct=struct, output=output)


@pytest.fixture
def invert_calls(monkeypatch):
    """Counts `CrossImageAttentionPipeline.invert` calls (they still run)."""
    calls = []
    invert = CrossImageAttentionPipeline.invert

    def spy(self, *args, **kwargs):
        calls.append(args)
        return invert(self, *args, **kwargs)

    monkeypatch.setattr(CrossImageAttentionPipeline, "invert", spy)
    return calls


@pytest.fixture
def rerun(first_run, tmp_path):
    """Runs the CLI again with the first run's inputs, in a copy of its output folder (cache included)."""
    output = tmp_path / "output"
    shutil.copytree(first_run.output, output)

    def run(*extra, app=first_run.app, struct=first_run.struct):
        assert main(cli_args(first_run.model, output, "--seed", "7", *extra, app=app, struct=struct)) == 0
        return output

    return run


def test_writes_transfer_strip_and_config(first_run):
    transfer = PIL.Image.open(first_run.output / "transfer.png")
    strip = PIL.Image.open(first_run.output / "strip.png")
    assert transfer.size == (SIZE, SIZE) and transfer.mode == "RGB"
    assert strip.size == (3 * SIZE, SIZE)
    # [structure | appearance | transfer], as the reference joins them
    np.testing.assert_array_equal(np.asarray(strip)[:, 2 * SIZE :], np.asarray(transfer))

    config = read_config(first_run.output)
    assert config["model"] == str(first_run.model)
    assert config["seed"] == 7
    assert config["num_timesteps"] == 6 and config["skip_steps"] == 2
    assert config["cross_attn_32_range"] == [1, 5] and config["adain_range"] == [2, 6]
    assert config["use_masked_adain"] is False and config["load_latents"] is False
    assert config["domain_name"] == "animal" and config["prompt"] == "A photo of a animal"
    assert config["app_image_path"] == str(first_run.app)
    assert config["dtype"] == "float32" and config["inversion_guidance_scale"] == 3.5
    assert config["versions"]["torch"] == torch.__version__
    assert set(config["versions"]) >= {"diffusers", "transformers", "cross_image_attention"}
    assert sorted(os.listdir(first_run.output / "inversions")) == sorted(inversion_names(first_run.output).values())


def test_load_latents_reuses_the_cache(first_run, rerun, invert_calls):
    output = rerun("--load_latents")
    assert invert_calls == []
    np.testing.assert_array_equal(pixels(output / "transfer.png"), pixels(first_run.output / "transfer.png"))


def test_without_load_latents_inverts_again(first_run, rerun, invert_calls):
    output = rerun()
    assert len(invert_calls) == 2
    for role, path in inversion_files(output).items():
        assert path.stat().st_mtime_ns > inversion_files(first_run.output)[role].stat().st_mtime_ns
    np.testing.assert_array_equal(pixels(output / "transfer.png"), pixels(first_run.output / "transfer.png"))


@pytest.mark.parametrize("missing", ["structure", "appearance"])
def test_partial_cache_keeps_the_seeded_noise(first_run, rerun, invert_calls, tmp_path, missing):
    # The structure draws its noise after the appearance's: with the appearance cached, its draws are skipped
    # instead of inverting it again, and the structure still gets the noise of an uncached run.
    os.remove(tmp_path / "output" / "inversions" / inversion_names(first_run.output)[missing])
    output = rerun("--load_latents")
    assert len(invert_calls) == 1
    np.testing.assert_array_equal(pixels(output / "transfer.png"), pixels(first_run.output / "transfer.png"))


def test_cache_follows_the_bytes_not_the_file_name(first_run, tmp_path, invert_calls):
    cache = tmp_path / "cache"
    shutil.copytree(first_run.output / "inversions", cache)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    app, struct = renamed / "zebra.jpg", renamed / "giraffe.jpg"
    shutil.copy(first_run.app, app)
    shutil.copy(first_run.struct, struct)

    def run(output):
        args = ["--seed", "7", "--load_latents", "--cache_dir", str(cache)]
        assert main(cli_args(first_run.model, output, *args, app=app, struct=struct)) == 0
        return inversion_names(output)

    first = inversion_names(first_run.output)
    assert run(tmp_path / "renamed_output") == first
    assert invert_calls == []
    # Other bytes, same pixels (JPEG decoders ignore trailing data): a new key for the appearance only.
    app.write_bytes(app.read_bytes() + b"\0")
    changed = run(tmp_path / "changed_output")
    assert len(invert_calls) == 1
    assert changed["appearance"] != first["appearance"] and changed["structure"] == first["structure"]
    assert (cache / changed["appearance"]).is_file()


def test_cache_key_covers_role_and_settings():
    settings = {"prompt": "A photo of a animal", "seed": 42, "num_timesteps": 100}
    key = cache_key(b"image", "appearance", settings)
    assert key == cache_key(b"image", "appearance", dict(settings))
    assert key != cache_key(b"image", "structure", settings)
    assert key != cache_key(b"image!", "appearance", settings)
    assert key != cache_key(b"image", "appearance", {**settings, "seed": 43})
    assert key != cache_key(b"image", "appearance", {**settings, "prompt": "A photo of a cat"})


def test_python_m_runs_the_bundled_example_with_masked_adain(saved_sd_dir, tmp_path):
    output = tmp_path / "output"
    model = ["--model", str(saved_sd_dir)]
    command = [sys.executable, "-m", "cross_image_attention", *model, "--output_path", str(output)]
    result = subprocess.run([*command, *FAST], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    config = read_config(output)
    assert config["app_image_path"] == str(cli.EXAMPLE_APPEARANCE)
    assert config["struct_image_path"] == str(cli.EXAMPLE_STRUCTURE)
    assert config["domain_name"] == cli.EXAMPLE_DOMAIN and config["use_masked_adain"] is True
    assert PIL.Image.open(output / "transfer.png").size == (SIZE, SIZE)
    assert PIL.Image.open(output / "strip.png").size == (3 * SIZE, SIZE)


def test_boolean_options():
    parse = build_parser().parse_args
    assert parse([]).use_masked_adain is True and parse([]).load_latents is False
    assert parse(["--use_masked_adain", "false"]).use_masked_adain is False
    assert parse(["--use_masked_adain", "True"]).use_masked_adain is True
    assert parse(["--no-use_masked_adain"]).use_masked_adain is False
    assert parse(["--load_latents"]).load_latents is True
    assert parse(["--load_latents", "no"]).load_latents is False


IMAGES = ["--app_image_path", "{app}", "--struct_image_path", "{struct}"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--app_image_path", "{tmp}/no.png", "--struct_image_path", "{struct}"], "--app_image_path: no such file"),
        (["--app_image_path", "{app}", "--struct_image_path", "{tmp}/notes.txt"], "--struct_image_path: not an image"),
        (["--app_image_path", "{tmp}", "--struct_image_path", "{struct}"], "--app_image_path: not a file: "),
        (["--struct_image_path", "{struct}"], "pass both --app_image_path and --struct_image_path, or neither"),
        ([*IMAGES, "--num_timesteps", "-1"], "--num_timesteps must be >= 1, got -1"),
        ([*IMAGES, "--skip_steps", "6"], "--skip_steps (6) must be smaller than --num_timesteps"),
        ([*IMAGES, "--adain_range", "6", "2"], "--adain_range must satisfy 0 <= start <= end, got (6, 2)"),
        ([*IMAGES, "--contrast_strength", "nan"], "--contrast_strength must be a finite number in [0, 100]"),
        ([*IMAGES, "--width", "0"], "--width must be positive"),
        ([*IMAGES, "--use_masked_adain", "true"], "--use_masked_adain needs --domain_name"),
        ([*IMAGES, "--model", "{tmp}/no_model"], "--model: no such folder: "),
        ([*IMAGES, "--model", "{tmp}"], "--model: not a diffusers pipeline folder (no model_index.json)"),
        ([*IMAGES, "--device", "toaster"], "--device: unknown device 'toaster'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line(saved_sd_dir, tmp_path, capsys, argv, message):
    (tmp_path / "notes.txt").write_text("not an image")
    paths = {"app": cli.EXAMPLE_APPEARANCE, "struct": cli.EXAMPLE_STRUCTURE, "tmp": tmp_path}
    argv = [arg.format(**paths) for arg in argv]
    assert main(cli_args(saved_sd_dir, tmp_path / "output", *argv, domain=None)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def one_error_line(capsys, message: str, alone: bool = True) -> str:
    """The error line; `alone`: stderr holds nothing else (else, after loading a model, its progress bars)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in err, err
    assert not alone or len(lines) == 1, err
    return lines[-1]


@pytest.fixture
def no_model_load(monkeypatch):
    """Makes loading the weights a test failure: every check must run before it."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_pipeline", load)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--height", "100"], "--height must be a multiple of 64, got 100"),
        (["--width", "65"], "--width must be a multiple of 64, got 65"),
        (["--seed", str(2**64)], "--seed must be in [0, 2**64 - 1]"),
        (["--seed", "-1"], "--seed must be in [0, 2**64 - 1]"),
        (["--num_timesteps", "1001"], "--num_timesteps must be at most 1000"),
        (["--use_masked_adain", "--prompt", "A cat"], "--object_noun 'animal' does not occur in the prompt"),
        (["--swap_guidance_scale", "1e300"], "--swap_guidance_scale must be a finite number in [0, 100]"),
        (["--device", "meta"], "--device meta: the meta device holds no data"),
    ],
)  # fmt: skip
def test_every_check_runs_before_the_model_loads(saved_sd_dir, tmp_path, capsys, no_model_load, argv, message):
    output = tmp_path / "output"
    assert main(cli_args(saved_sd_dir, output, *argv)) == 1  # the bundled pair
    one_error_line(capsys, message)
    assert not output.exists()  # and no empty output folder is left behind


def test_flags_in_the_users_spelling(saved_sd_dir, tmp_path, capsys, no_model_load, monkeypatch):
    (tmp_path / "file").write_text("in the way")
    assert main(cli_args(saved_sd_dir, tmp_path / "file" / "out")) == 1
    one_error_line(capsys, "--output_path: ")
    assert main(cli_args(saved_sd_dir, tmp_path / "o", "--cache_dir", str(tmp_path / "file"))) == 1
    one_error_line(capsys, "--cache_dir: ")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # the bundled images are then decompression bombs
    assert main(cli_args(saved_sd_dir, tmp_path / "o")) == 1
    one_error_line(capsys, "--app_image_path: image too large")


def test_a_model_missing_from_the_offline_cache_is_one_line(tmp_path, capsys):
    output = tmp_path / "output"
    assert main(cli_args("nobody-cia-test/not-cached", output)) == 1
    err = one_error_line(capsys, "--model: nobody-cia-test/not-cached is not in the local Hugging Face cache")
    assert "stacktrace" not in err and "local copy" in err
    assert not output.exists()


def test_ctrl_c_is_one_line_and_exit_130(saved_sd_dir, tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert main(cli_args(saved_sd_dir, tmp_path)) == 130
    one_error_line(capsys, "interrupted")


def test_non_finite_latents_are_an_error_not_a_black_image(first_run, tmp_path, capsys, monkeypatch):
    from cross_image_attention import pipeline_cross_image

    output = tmp_path / "output"
    shutil.copytree(first_run.output / "inversions", output / "inversions")
    monkeypatch.setattr(pipeline_cross_image, "adain_per_pair", lambda out, *args: out * math.inf)
    args = cli_args(
        first_run.model, output, "--seed", "7", "--load_latents", app=first_run.app, struct=first_run.struct
    )
    assert main(args) == 1
    one_error_line(capsys, "The denoised latents are not finite", alone=False)
    assert not (output / "transfer.png").exists() and not (output / "strip.png").exists()


def test_corrupt_cache_entries_are_reported_and_recomputed(first_run, rerun, invert_calls, capsys, tmp_path):
    output = first_run.output
    files = inversion_files(output)
    # Truncate the appearance entry in rerun's copy, and leave an old `.partial` of a killed run beside it.
    target = tmp_path / "output"
    appearance = target / "inversions" / files["appearance"].name
    appearance.write_bytes(appearance.read_bytes()[:100])
    stale = target / "inversions" / f".{appearance.name}.0123.partial"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    rerun("--load_latents")
    err = capsys.readouterr().err
    assert "warning: ignoring the unreadable cached appearance inversion" in err
    assert len(invert_calls) == 1 and not stale.exists()
    assert InversionResult.load(appearance).batch_size == 1  # rewritten
    np.testing.assert_array_equal(pixels(target / "transfer.png"), pixels(output / "transfer.png"))
    umask = os.umask(0)
    os.umask(umask)
    for path in (appearance, target / "transfer.png", target / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_pipeline_errors_pass_through_as_one_line(saved_sd_dir, tmp_path, capsys, monkeypatch):
    from cross_image_attention.pipeline_cross_image import CrossImageAttentionPipeline

    def bad_call(self, **kwargs):
        raise ValueError("`skip_steps` is wrong\nover two lines")

    monkeypatch.setattr(CrossImageAttentionPipeline, "__call__", bad_call)
    assert main(cli_args(saved_sd_dir, tmp_path / "output", domain=None)) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # model loading prints its progress bar before
    assert lines[-1] == "error: `skip_steps` is wrong over two lines"
    assert sum(line.startswith("error:") for line in lines) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["--use_masked_adain", "maybe"], "argument --use_masked_adain: expected true or false"),
        (["--adain_range", "1"], "argument --adain_range: expected 2 arguments"),
        (["--seed", "x"], "argument --seed: invalid int value"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    ],
)
def test_argparse_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 1
    one_error_line(capsys, message)


def test_help_still_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--swap_guidance_scale" in capsys.readouterr().out


def test_examples_are_small_and_licensed():
    folder = cli.EXAMPLES
    licence = (folder / "LICENSE.md").read_text()
    images = sorted(path.name for path in folder.iterdir() if path.name != "LICENSE.md")
    assert images == sorted([cli.EXAMPLE_APPEARANCE.name, cli.EXAMPLE_STRUCTURE.name])
    assert all(name in licence for name in images)
    assert sum(path.stat().st_size for path in folder.iterdir()) < 1_000_000
    for path in (cli.EXAMPLE_APPEARANCE, cli.EXAMPLE_STRUCTURE):
        with PIL.Image.open(path) as image:
            assert image.mode == "RGB" and min(image.size) <= 512


def test_subcommands_are_dispatched(tmp_path, capsys):
    assert main(["hub", "stage", "--output", str(tmp_path / "staged")]) == 0
    assert (tmp_path / "staged" / "pipeline.py").is_file() and (tmp_path / "staged" / "README.md").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", "--help"])
    assert exit_info.value.code == 0
    assert "--manifest" in capsys.readouterr().out


def test_help_needs_no_torch_and_prints_no_library_notice():
    """Parsing the command line imports neither torch, diffusers nor transformers (they take seconds)."""
    code = (
        "import sys; from cross_image_attention import cli; cli.build_parser().parse_args(['--seed', '3']); "
        "print(sorted(name for name in ('torch', 'diffusers', 'transformers') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]" and result.stderr == ""
    result = subprocess.run(
        [sys.executable, "-m", "cross_image_attention", "--help"], capture_output=True, text=True, check=True
    )
    assert "--num_timesteps" in result.stdout and result.stderr == ""


def test_command_line_defaults_are_the_pipeline_signature():
    # Read from the source (no import) for a fast --help; the same values as the imported signature.
    from cross_image_attention.pipeline_cross_image import call_defaults

    assert cli.DEFAULTS == call_defaults()
