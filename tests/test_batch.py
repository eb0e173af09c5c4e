"""The batch command: a manifest in-process on the tiny saved model, and on two CPU processes under accelerate."""

import csv
import json
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

from cross_image_attention import CrossImageAttentionPipeline, batch, cli

PARITY = Path(__file__).parent / "data" / "parity"
FAST = [
    "--height", "64", "--width", "64", "--num_timesteps", "6", "--skip_steps", "2",
    "--cross_attn_32_range", "1", "5", "--cross_attn_64_range", "1", "5", "--adain_range", "2", "6",
    "--use_masked_adain", "false", "--seed", "7",
]  # fmt: skip
HEADER = ["appearance", "structure", "domain_name", "seed", "swap_guidance_scale"]
# One appearance against three structures (a transfer-only override on one row, the global seed spelled out on
# another), a missing image and a bad cell.
ROWS = [
    ["raccoon.jpg", "chelsea.jpg", "animal", "", ""],
    ["raccoon.jpg", "astronaut.png", "animal", "", "2.5"],
    ["missing.png", "chelsea.jpg", "animal", "", ""],
    ["raccoon.jpg", "chelsea.png", "animal", "7", ""],
    ["raccoon.jpg", "chelsea.jpg", "animal", "many", ""],
]
DONE_ROWS = {0: "raccoon__chelsea_", 1: "raccoon__astronaut_", 3: "raccoon__chelsea_"}  # each folder's name begins
FAILED_ROWS = {2: "appearance: no such file: ", 4: "row 4: seed: invalid value 'many'"}


def write_manifest(path: Path, rows: list, header: list = HEADER) -> Path:
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    return path


def batch_args(model, manifest, output, *extra) -> list:
    return ["--manifest", str(manifest), "--model", str(model), "--output_path", str(output), *FAST, *extra]


def folders_of(argv: list) -> list:
    """The output folder of each row of a batch command line's manifest, as the batch names it."""
    options = batch.parse_args(argv)
    pairs = batch.read_manifest(options.manifest)
    batch.key_rows(options, pairs)
    return [pair.name for pair in pairs]


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def launch_command(processes: int = 2) -> list:
    """`accelerate launch` of the batch on `processes` CPU processes (with `launch_env`)."""
    # accelerate starts several local processes with torchrun (`--multi_gpu`); ACCELERATE_USE_CPU puts them on CPUs
    # (as its `debug_launcher` does).
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "cross_image_attention.batch",
    ]  # fmt: skip


def launch_env(tmp_path) -> dict:
    """The environment of `launch_command`: CPU processes, and a private HF_HOME that keeps this machine's
    accelerate config out."""
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf_home")}


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The bundled pair and the parity photos, in one folder next to which manifests are written."""
    folder = tmp_path_factory.mktemp("images")
    for source in (cli.EXAMPLE_APPEARANCE, cli.EXAMPLE_STRUCTURE, PARITY / "astronaut.png", PARITY / "chelsea.png"):
        shutil.copy(source, folder)
    return folder


def spy_on_invert(monkeypatch) -> list:
    """The pixels of every image given to `CrossImageAttentionPipeline.invert` (the calls still run)."""
    calls = []
    invert = CrossImageAttentionPipeline.invert

    def spy(self, image, *args, **kwargs):
        calls.append(np.asarray(image))
        return invert(self, image, *args, **kwargs)

    monkeypatch.setattr(CrossImageAttentionPipeline, "invert", spy)
    return calls


@pytest.fixture
def invert_calls(monkeypatch):
    return spy_on_invert(monkeypatch)


@pytest.fixture(scope="module")
def first_batch(saved_sd_dir, images):
    """One in-process run of `ROWS`; tests copy its output folder before running again."""
    manifest = write_manifest(images / "pairs.csv", ROWS)
    output = images.parent / "batch_output"
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = spy_on_invert(monkeypatch)
        code = batch.main(batch_args(saved_sd_dir, manifest, output, "--device", "cpu"))
    return SimpleNamespace(model=saved_sd_dir, manifest=manifest, output=output, code=code, invert_calls=calls)


@pytest.fixture
def rerun(first_batch, tmp_path):
    """Runs the batch again in a copy of the first run's output folder (cache included)."""
    output = tmp_path / "output"
    shutil.copytree(first_batch.output, output)

    def run(manifest=first_batch.manifest):
        code = batch.main(batch_args(first_batch.model, manifest, output, "--device", "cpu"))
        return code, read_json(output / "summary.json")

    return run


def test_every_row_is_done_or_reported_failed(first_batch):
    assert first_batch.code == 1
    summary = read_json(first_batch.output / "summary.json")
    assert (summary["done"], summary["skipped"], summary["failed"]) == (3, 0, 2)
    assert [pair["row"] for pair in summary["pairs"]] == list(range(len(ROWS)))
    for pair in summary["pairs"]:
        folder = first_batch.output / pair["folder"]
        if pair["row"] in DONE_ROWS:
            assert pair["status"] == "done" and pair["folder"].startswith(DONE_ROWS[pair["row"]])
            assert {"transfer.png", "strip.png", "config.json", "done"} <= set(os.listdir(folder))
            assert not (folder / "error.txt").exists()
        else:
            assert pair["status"] == "failed" and FAILED_ROWS[pair["row"]] in pair["error"]
            assert not (folder / "done").exists()
            assert (folder / "error.txt").read_text().startswith(pair["error"])


def test_config_records_the_row(first_batch, images):
    folder = folders_of(batch_args(first_batch.model, first_batch.manifest, first_batch.output))[1]
    config = read_json(first_batch.output / folder / "config.json")
    assert config["app_image_path"] == str(images / "raccoon.jpg")
    assert config["struct_image_path"] == str(images / "astronaut.png")
    assert config["swap_guidance_scale"] == 2.5 and config["seed"] == 7
    assert config["prompt"] == "A photo of a animal" and config["process_index"] == 0
    assert config["output_path"] == str(first_batch.output / folder)
    # What the numbers depend on besides the inputs, so that two runs' differences can be told apart.
    numerics = config["numerics"]
    assert numerics["device"] == "cpu" and numerics["dtype"] == "float32"
    assert numerics["torch_threads"] == torch.get_num_threads()
    assert {"machine", "accelerate", "numpy", "deterministic_algorithms"} <= numerics.keys()
    assert {"torch", "diffusers", "transformers", "python"} <= config["versions"].keys()


def test_shared_appearance_is_inverted_once(first_batch, images):
    calls = first_batch.invert_calls
    appearance = np.asarray(PIL.Image.open(images / "raccoon.jpg").convert("RGB"))
    assert len(calls) == 4  # the appearance once, then each structure
    assert sum(np.array_equal(call, appearance) for call in calls) == 1
    cache = sorted(os.listdir(first_batch.output / "inversions"))
    assert len(cache) == 4 and all(name.endswith(".safetensors") for name in cache)


@pytest.mark.parametrize(
    ("row", "extra"),
    [(0, []), (1, ["--swap_guidance_scale", "2.5"])],
    ids=["appearance inverted", "appearance from the cache"],
)
def test_rows_equal_the_single_pair_command(first_batch, images, tmp_path, row, extra):
    app, struct = (images / name for name in ROWS[row][:2])
    output = tmp_path / "single"
    single = ["--app_image_path", str(app), "--struct_image_path", str(struct), "--domain_name", "animal"]
    model = ["--model", str(first_batch.model), "--output_path", str(output), "--device", "cpu"]
    assert cli.main([*single, *model, *FAST, *extra]) == 0
    folder = first_batch.output / folders_of(batch_args(first_batch.model, first_batch.manifest, output))[row]
    for name in ("transfer.png", "strip.png"):
        np.testing.assert_array_equal(pixels(folder / name), pixels(output / name))
    # Same cache keys: the single-pair command and the batch share their inversions.
    assert read_json(folder / "config.json")["inversions"].keys() == {"appearance", "structure"}
    batch_files = {role: Path(path).name for role, path in read_json(folder / "config.json")["inversions"].items()}
    single_files = {role: Path(path).name for role, path in read_json(output / "config.json")["inversions"].items()}
    assert batch_files == single_files


def test_rerun_skips_done_rows(rerun, invert_calls, first_batch):
    code, summary = rerun()
    assert code == 1 and invert_calls == []
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 3, 2)
    assert {pair["row"] for pair in summary["pairs"] if pair["status"] == "skipped"} == set(DONE_ROWS)


def test_changed_row_runs_again_from_the_cache(rerun, invert_calls, first_batch, images):
    rows = [list(row) for row in ROWS]
    rows[1][4] = "1.5"
    code, summary = rerun(write_manifest(images / "changed.csv", rows))
    assert code == 1 and invert_calls == []
    assert {pair["row"]: pair["status"] for pair in summary["pairs"] if pair["row"] in DONE_ROWS} == {
        0: "skipped",
        1: "done",
        3: "skipped",
    }


def test_a_replaced_image_runs_its_row_again_and_is_reported(first_batch, images, tmp_path, invert_calls, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("raccoon.jpg", "chelsea.jpg", "astronaut.png"):
        shutil.copy(images / name, folder)
    output = tmp_path / "output"
    shutil.copytree(first_batch.output / "inversions", output / "inversions")  # the pairs are transfers only
    args = batch_args(first_batch.model, write_manifest(folder / "pairs.csv", ROWS[:2]), output, "--device", "cpu")
    assert batch.main(args) == 0
    before = folders_of(args)
    shutil.copy(images / "chelsea.png", folder / "chelsea.jpg")  # other bytes under the same name
    capsys.readouterr()
    assert batch.main(args) == 0

    after = folders_of(args)
    assert after[0] != before[0] and after[1] == before[1]
    summary = read_json(output / "summary.json")
    assert [pair["status"] for pair in summary["pairs"]] == ["done", "skipped"]
    assert summary["pairs"][0]["changed"] == {"was": f"stale/{before[0]}", "inputs": ["structure image"]}
    assert f"{after[0]}: structure image changed since stale/{before[0]} was finished" in capsys.readouterr().err
    # The old transfer is kept aside, where it does not pass for the row's; the new one is row 3's of the first run.
    assert sorted(os.listdir(output)) == sorted([*after, "inversions", "stale", "summary.json"])
    assert os.listdir(output / "stale") == [before[0]]
    row_3 = first_batch.output / folders_of(batch_args(first_batch.model, first_batch.manifest, output))[3]
    np.testing.assert_array_equal(pixels(output / after[0] / "transfer.png"), pixels(row_3 / "transfer.png"))
    assert invert_calls == []


def test_a_row_inserted_at_the_top_runs_alone(rerun, invert_calls, first_batch, images, tmp_path):
    rows = [["raccoon.jpg", "chelsea.jpg", "animal", "", "1.5"], *ROWS]
    code, summary = rerun(write_manifest(images / "inserted.csv", rows))
    assert code == 1 and invert_calls == []
    statuses = [pair["status"] for pair in summary["pairs"]]
    assert statuses == ["done", "skipped", "skipped", "failed", "skipped", "failed"]
    assert not any("changed" in pair for pair in summary["pairs"])
    # Every finished folder is a row's: none is left over from the rows' former positions.
    output = tmp_path / "output"
    finished = {path.parent.name for path in output.glob("*/done")}
    assert finished == {pair["folder"] for pair in summary["pairs"] if pair["status"] in ("done", "skipped")}
    assert not (output / "stale").exists()


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (["appearance", "structure"], "missing column(s) 'domain_name'"),
        (["appearance", "structure", "domain_name", "sead"], "unknown column(s) 'sead'"),
        (["appearance", "structure", "domain_name", "seed", "seed"], "repeated column(s) 'seed'"),
        (None, "no rows"),
    ],
)
def test_malformed_manifest_is_one_error_line(saved_sd_dir, tmp_path, capsys, invert_calls, header, message):
    manifest = tmp_path / "pairs.csv"
    if header is None:
        manifest.write_text("appearance,structure,domain_name\n")
    else:
        write_manifest(manifest, [["a.png", "b.png", "animal", "1", "2"][: len(header)]], header)
    assert batch.main(batch_args(saved_sd_dir, manifest, tmp_path / "output")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --manifest ") and message in err and len(err.splitlines()) == 1, err
    assert invert_calls == []


def test_processes_that_accelerate_did_not_join_are_refused(monkeypatch):
    # torchrun's processes on a machine without GPUs, launched without ACCELERATE_USE_CPU: each would run every row.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes were launched .* set ACCELERATE_USE_CPU=true"):
        batch.check_process_group(SimpleNamespace(num_processes=1))
    batch.check_process_group(SimpleNamespace(num_processes=2))


@pytest.mark.parametrize(
    "argv",
    [["--app_image_path", "a.png"], ["--load_latents"], ["--num_timesteps", "x"], []],
    ids=["column option", "load_latents", "bad value", "no manifest"],
)
def test_argparse_refuses_options(tmp_path, capsys, argv):
    manifest = ["--manifest", str(tmp_path / "pairs.csv")] if argv else []
    assert batch.main([*manifest, *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_accelerate_splits_the_rows_between_two_processes(saved_sd_dir, images, tmp_path):
    rows = [row for row in ROWS if row[0] != "missing.png" and row[3] != "many"]
    rows.insert(1, ["raccoon.jpg", "chelsea.jpg", "animal", "", "1.5"])
    rows.append(["astronaut.png", "chelsea.jpg", "person", "", ""])
    manifest = write_manifest(tmp_path / "pairs.csv", [[images / row[0], images / row[1], *row[2:]] for row in rows])
    output = tmp_path / "output"
    # A file where row 1's folder should be fails that row only: the handler that reports it used to fail too (it
    # made the folder), which stopped both processes.
    output.mkdir()
    in_the_way = folders_of(batch_args(saved_sd_dir, manifest, output))[1]
    (output / in_the_way).write_text("in the way\n")
    result = subprocess.run(
        [*launch_command(), *batch_args(saved_sd_dir, manifest, output)],
        capture_output=True,
        text=True,
        env=launch_env(tmp_path),
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]

    summary = read_json(output / "summary.json")
    assert (summary["done"], summary["skipped"], summary["failed"]) == (4, 0, 1)
    assert [pair["row"] for pair in summary["pairs"]] == [0, 1, 2, 3, 4]  # each row once
    # accelerate's contiguous split: rows 0-2 on process 0, rows 3-4 on process 1.
    assert [pair["process_index"] for pair in summary["pairs"]] == [0, 0, 0, 1, 1]
    failed = summary["pairs"][1]
    assert failed["status"] == "failed" and "not a folder" in failed["error"]
    assert "error.txt not written" in failed["error"]
    assert f"error: {in_the_way}: {failed['error']}" in result.stderr
    # No traceback of the batch (the launcher prints its own report of a process that exits with status 1).
    assert "batch.py" not in result.stderr
    for pair in summary["pairs"]:
        if pair["row"] != 1:
            folder = output / pair["folder"]
            assert pair["status"] == "done" and (folder / "done").is_file()
            assert not (folder / "claim.json").exists()
            assert read_json(folder / "config.json")["process_index"] == pair["process_index"]
    assert sorted(os.listdir(output)) == sorted(
        [pair["folder"] for pair in summary["pairs"]] + ["inversions", "summary.json"]
    )
    assert result.stdout.count("5 pairs: 4 done, 0 skipped, 1 failed") == 1  # printed by the main process only
