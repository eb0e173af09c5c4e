"""`cross-image-attention evaluate` on run folders written here by hand (tiny PNGs, no diffusion pipeline), scored
with tiny random DINO and CLIP models saved from configs."""

import csv
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from test_metrics import (  # noqa: F401 (one_thread: the autouse fixture applies to this module too)
    NEGATIVE_PROMPT,
    POSITIVE_PROMPT,
    build_clip,
    build_dino,
    build_lpips,
    one_thread,
    photo,
)

from cross_image_attention import cli, evaluate, metrics


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """The tiny DINO and CLIP models (with tokenizer) saved as folders, for --dino_model and --clip_model."""
    folder = tmp_path_factory.mktemp("metric_models")
    build_dino().save_pretrained(folder / "dino")
    clip, tokenizer = build_clip()
    clip.save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    return folder / "dino", folder / "clip"


@pytest.fixture(scope="module")
def models(model_dirs):
    """The same models loaded from their folders, with a random LPIPS (its download is not available offline)."""
    return metrics.MetricModels(str(model_dirs[0]), str(model_dirs[1]), lpips_net=build_lpips(), device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input photos (64 x 64), a small output (48 x 40) and a mask of the edited square."""
    folder = tmp_path_factory.mktemp("inputs")
    photo("chelsea").save(folder / "cat.png")
    photo("astronaut").save(folder / "astronaut.png")
    photo("astronaut", (48, 40)).save(folder / "astronaut_small.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    PIL.Image.fromarray(mask).save(folder / "mask.png")
    edited = np.array(photo("chelsea"))
    edited[16:48, 16:48] = np.array(photo("astronaut"))[16:48, 16:48]
    PIL.Image.fromarray(edited).save(folder / "edited.png")
    return folder


def write_row(folder: Path, config: dict | None, output: Path | None = None, output_name="transfer.png", done=False):
    """A row folder as `batch` leaves it: config.json, the output, a done marker (each optional)."""
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    if output is not None:
        (folder / output_name).write_bytes(output.read_bytes())
    if done:
        (folder / "done").write_text("0123abcd\n")
    return folder


def transfer_config(inputs: Path, appearance: str, structure: str, **extra) -> dict:
    """The entries of an appearance-transfer row's config.json that evaluate reads, with a few settings (`batch`
    adds `process_index`)."""
    return {
        "app_image_path": str(inputs / appearance),
        "struct_image_path": str(inputs / structure),
        "prompt": "A photo of a animal",
        "seed": 42,
        "cross_attn_32_range": [10, 70],
        **extra,
    }


def batch_run(folder: Path, inputs: Path, flip_outputs: bool = False) -> Path:
    """Two done rows (one output smaller than its inputs), one in progress, one failed, one never started."""
    outputs = [inputs / "astronaut.png", inputs / "astronaut_small.png"]
    if flip_outputs:
        flipped = folder.parent / f"{folder.name}_flipped"
        flipped.mkdir(parents=True)
        for index, path in enumerate(outputs):
            PIL.Image.open(path).transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT).save(flipped / f"{index}.png")
        outputs = [flipped / "0.png", flipped / "1.png"]
    for name, appearance, structure, output, done in [
        ("0000_astronaut__cat", "astronaut.png", "cat.png", outputs[0], True),
        ("0001_cat__astronaut", "cat.png", "astronaut.png", outputs[1], True),
        ("0002_cat__cat", "cat.png", "cat.png", inputs / "cat.png", False),
    ]:
        config = transfer_config(inputs, appearance, structure, process_index=0)
        write_row(folder / name, config, output, done=done)
    failed = write_row(folder / "0003_missing__cat", None)
    (failed / "error.txt").write_text(
        "appearance: no such file: missing.png\n\nTraceback (most recent call last): ..."
    )
    (folder / "inversions").mkdir()
    names = sorted(path.name for path in folder.iterdir() if path.name != "inversions")
    pairs = [{"row": index, "folder": name} for index, name in enumerate(names)]
    pairs.append({"row": 4, "folder": "0004_gone__cat"})
    (folder / "summary.json").write_text(json.dumps({"pairs": pairs}))
    return folder


def model_args(model_dirs) -> list[str]:
    return ["--dino_model", str(model_dirs[0]), "--clip_model", str(model_dirs[1]), "--device", "cpu"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def image(path: Path) -> PIL.Image.Image:
    return PIL.Image.open(path).convert("RGB")


def test_a_batch_run_is_scored_with_its_settings_and_unfinished_rows_listed(
    tmp_path, inputs, model_dirs, models, capsys
):
    run = batch_run(tmp_path / "run", inputs)
    assert cli.main(["evaluate", str(run), *model_args(model_dirs)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: 2 rows scored, 3 not scored" in out
    assert "0002_cat__cat: not finished: no done marker" in out
    assert "0003_missing__cat: failed: appearance: no such file: missing.png" in out
    assert "0004_gone__cat: not finished: no folder" in out
    assert "structure_distance  lower" in out and "dino_similarity     higher" in out

    rows = read_csv(run / "metrics.csv")
    assert [row["row"] for row in rows] == ["0000_astronaut__cat", "0001_cat__astronaut"]
    assert list(rows[0])[:4] == ["row", "kind", "structure_distance", "dino_similarity"]
    assert rows[0]["kind"] == "appearance_transfer" and rows[0]["seed"] == "42"
    assert rows[0]["cross_attn_32_range"] == "[10, 70]"
    # The same numbers as the metric functions; the 48 x 40 output is resized to its 64 x 64 structure image.
    for row, (appearance, structure, output) in zip(
        rows, [("astronaut", "cat", "astronaut"), ("cat", "astronaut", "astronaut_small")]
    ):
        output = image(inputs / f"{output}.png")
        expected = metrics.structure_distance(image(inputs / f"{structure}.png"), output, models)
        assert float(row["structure_distance"]) == pytest.approx(expected, abs=1e-6)
        expected = metrics.dino_similarity(image(inputs / f"{appearance}.png"), output, models)
        assert float(row["dino_similarity"]) == pytest.approx(expected, abs=1e-6)
    assert float(rows[0]["dino_similarity"]) == pytest.approx(1, abs=1e-6)  # the output is the appearance image

    document = json.loads((run / "metrics.json").read_text())
    assert document["models"] == {
        "dino_model": str(model_dirs[0]),
        "clip_model": str(model_dirs[1]),
        "lpips_net": "squeeze",
        "gram": False,
    }
    assert document["metrics"]["structure_distance"]["direction"] == "lower"
    assert document["metrics"]["dino_similarity"]["count"] == 2
    assert document["rows"][1]["config"]["struct_image_path"] == str(inputs / "astronaut.png")
    assert document["unscored"] == [
        {"row": "0002_cat__cat", "reason": "not finished: no done marker"},
        {"row": "0003_missing__cat", "reason": "failed: appearance: no such file: missing.png"},
        {"row": "0004_gone__cat", "reason": "not finished: no folder"},
    ]
    sheet = PIL.Image.open(run / "metrics.png")
    assert sheet.width > 3 * evaluate.THUMB and sheet.height > 2 * evaluate.THUMB


def test_each_kind_gets_its_metrics(tmp_path, inputs, models, capsys):
    run = tmp_path / "kinds"
    edit = {"kind": "editing", "source_image_path": str(inputs / "cat.png"), "source_prompt": "a cat"}
    write_row(
        run / "0000_edit",
        {**edit, "target_prompt": POSITIVE_PROMPT, "mask_path": str(inputs / "mask.png"), "output_image": "edit.png"},
        inputs / "edited.png",
        "edit.png",
    )
    write_row(
        run / "0001_edit_no_mask", {**edit, "target_prompt": NEGATIVE_PROMPT}, inputs / "edited.png", "output.png"
    )
    style = {"kind": "style", "style_image_path": str(inputs / "astronaut.png"), "prompt": POSITIVE_PROMPT}
    write_row(run / "0002_style", style, inputs / "cat.png", "output.png")
    write_row(run / "0003_video", {"kind": "video"}, inputs / "cat.png", "output.png")
    write_row(run / "0004_lost", transfer_config(inputs, "lost.png", "cat.png"), inputs / "cat.png")
    no_prompt = {"kind": "style", "style_image_path": str(inputs / "cat.png")}
    write_row(run / "0005_no_prompt", no_prompt, inputs / "cat.png", "output.png")

    (scored,) = evaluate.evaluate([run], models, lpips=True, gram=True)
    rows = {row.name: row for row in scored.rows}
    pixel = ["lpips", "psnr", "ssim", "mse"]
    assert list(rows["0000_edit"].scores) == [
        "structure_distance",
        "clip_score",
        "clip_score_edited",
        *pixel,
        *(f"{name}_outside_mask" for name in pixel),
    ]
    assert list(rows["0001_edit_no_mask"].scores) == ["structure_distance", "clip_score", *pixel]
    assert list(rows["0002_style"].scores) == ["dino_similarity", "gram_distance", "clip_score"]
    assert dict(scored.unscored) == {
        "0003_video": "cannot score: unknown kind 'video' (expected one of appearance_transfer, editing, style)",
        "0004_lost": f"cannot score: appearance image not found: {inputs / 'lost.png'}",
        "0005_no_prompt": "cannot score: config.json has no prompt",
    }

    source, edited, mask = image(inputs / "cat.png"), image(inputs / "edited.png"), PIL.Image.open(inputs / "mask.png")
    scores = rows["0000_edit"].scores
    assert scores["structure_distance"] == pytest.approx(metrics.structure_distance(source, edited, models), abs=1e-6)
    assert scores["clip_score"] == pytest.approx(metrics.clip_score(edited, POSITIVE_PROMPT, models), abs=1e-4)
    assert scores["clip_score"] > 0 and rows["0001_edit_no_mask"].scores["clip_score"] == 0
    edited_region = metrics.clip_score(edited, POSITIVE_PROMPT, models, mask=mask)
    assert scores["clip_score_edited"] == pytest.approx(edited_region, abs=1e-4)
    assert scores["lpips"] == pytest.approx(metrics.lpips_distance(source, edited, models), abs=1e-6)
    assert scores["psnr"] == pytest.approx(metrics.psnr(source, edited))
    assert scores["ssim"] == pytest.approx(metrics.ssim(source, edited))
    # The edit changed only the masked square: nothing differs outside it.
    assert scores["mse_outside_mask"] == 0 and scores["lpips_outside_mask"] == 0 and scores["ssim_outside_mask"] == 1
    assert scores["psnr_outside_mask"] == float("inf")
    style_scores = rows["0002_style"].scores
    reference, output = image(inputs / "astronaut.png"), image(inputs / "cat.png")
    assert style_scores["dino_similarity"] == pytest.approx(
        metrics.dino_similarity(reference, output, models), abs=1e-6
    )
    assert style_scores["gram_distance"] == pytest.approx(metrics.gram_distance(reference, output, models), rel=1e-5)
    assert style_scores["clip_score"] == pytest.approx(metrics.clip_score(output, POSITIVE_PROMPT, models), abs=1e-4)

    document = json.loads((run / "metrics.json").read_text())
    assert document["rows"][0]["scores"]["psnr_outside_mask"] is None  # JSON has no infinity
    assert document["rows"][0]["prompts"] == {"target_prompt": POSITIVE_PROMPT}
    assert read_csv(run / "metrics.csv")[0]["psnr_outside_mask"] == "inf"
    assert "3 rows scored, 3 not scored" in capsys.readouterr().out


def test_two_runs_side_by_side_with_the_difference(tmp_path, inputs, model_dirs, capsys):
    first, second = batch_run(tmp_path / "a", inputs), batch_run(tmp_path / "b", inputs, flip_outputs=True)
    argv = ["evaluate", str(first), str(second), *model_args(model_dirs), "--output_path", str(tmp_path / "cmp")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Comparison (means; differences to the first run):" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("metric") and "b - a" in line)
    assert header.split() == ["metric", "better", "a", "b", "b", "-", "a"]
    # Flipped outputs keep the appearance about but not the structure: a worse (higher) structure distance.
    structure = out.splitlines()[out.splitlines().index(header) + 1].split()
    assert structure[0] == "structure_distance" and structure[-1] == "(worse)" and structure[-2].startswith("+")

    a_rows, b_rows = read_csv(first / "metrics.csv"), read_csv(second / "metrics.csv")
    compared = read_csv(tmp_path / "cmp" / "comparison.csv")
    assert [row["row"] for row in compared] == ["0000_astronaut__cat", "0001_cat__astronaut"]
    for row, a_row, b_row in zip(compared, a_rows, b_rows):
        for metric in ("structure_distance", "dino_similarity"):
            assert float(row[f"{metric}:a"]) == float(a_row[metric]) and float(row[f"{metric}:b"]) == float(
                b_row[metric]
            )
            difference = float(b_row[metric]) - float(a_row[metric])
            assert float(row[f"{metric}:b - a"]) == pytest.approx(difference)
    # A flipped output keeps its CLS token about, but not its structure.
    assert float(compared[1]["structure_distance:b - a"]) > 0.01

    document = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    summary = document["metrics"]["structure_distance"]
    mean = np.mean([float(row["structure_distance"]) for row in b_rows])
    assert summary["means"]["b"] == pytest.approx(mean)
    assert summary["differences"]["b - a"] == pytest.approx(summary["means"]["b"] - summary["means"]["a"])
    assert summary["paired"]["b - a"]["rows"] == 2
    assert document["shared_rows"] == ["0000_astronaut__cat", "0001_cat__astronaut"]
    assert PIL.Image.open(tmp_path / "cmp" / "comparison.png").height > 2 * evaluate.THUMB
    assert (second / "metrics.png").is_file()


def test_a_single_pair_run_with_relative_inputs(tmp_path, inputs, model_dirs, capsys):
    run = write_row(tmp_path / "output", transfer_config(Path(), "astronaut.png", "cat.png"), inputs / "cat.png")
    assert cli.main(["evaluate", str(run), *model_args(model_dirs), "--inputs_root", str(inputs)]) == 0
    (row,) = read_csv(run / "metrics.csv")
    assert row["row"] == "output" and float(row["structure_distance"]) == 0
    assert row["structure_image"] == str(inputs / "cat.png")
    capsys.readouterr()
    # Relative to the current directory by default, where they are not: the row is listed, nothing is scored.
    (run / "metrics.csv").unlink()
    assert cli.main(["evaluate", str(run), *model_args(model_dirs)]) == 1
    assert capsys.readouterr().err == (
        f"error: {run}: no finished row to score: output: cannot score: structure image not found: cat.png\n"
    )


def test_an_unreadable_output_is_listed_and_the_others_scored(tmp_path, inputs, models):
    run = batch_run(tmp_path / "run", inputs)
    (run / "0001_cat__astronaut" / "transfer.png").write_text("not a png")
    (scored,) = evaluate.evaluate([run], models, lpips=False)
    assert [row.name for row in scored.rows] == ["0000_astronaut__cat"]
    assert dict(scored.unscored)["0001_cat__astronaut"].startswith("cannot score: cannot read the image ")


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda root, inputs: root / "missing", [], "{run}: no such folder"),
        (lambda root, inputs: (root / "empty").mkdir() or root / "empty", [], "{run}: not a run folder"),
        (
            lambda root, inputs: write_row(root / "r" / "0000_a__b", None).parent,
            [],
            "{run}: no finished row to score: 0000_a__b: not finished: no config.json",
        ),
        (lambda root, inputs: batch_run(root / "r", inputs), ["--dino_model", "{root}/nowhere"], "dino_model '"),
        (lambda root, inputs: batch_run(root / "r", inputs), ["--batch_size", "0"], "--batch_size must be at least 1"),
        (lambda root, inputs: batch_run(root / "r", inputs), ["{run}"], "a run is given more than once: {run}"),
    ],
    ids=["missing", "empty", "unfinished", "offline-model", "batch-size", "twice"],
)
def test_bad_input_is_one_error_line(tmp_path, inputs, model_dirs, capsys, make, extra, message):
    run = make(tmp_path, inputs)
    extra = [item.format(root=tmp_path, run=run) for item in extra]
    assert cli.main(["evaluate", str(run), *model_args(model_dirs), *extra]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: " + message.format(run=run)), captured.err
    assert captured.err.count("\n") == 1


def test_a_batch_of_rows_is_scored_in_chunks_like_one_by_one(tmp_path, inputs, models, model_dirs):
    run = batch_run(tmp_path / "run", inputs)
    (together,) = evaluate.evaluate([run], models, lpips=False, gram=True)
    one_by_one = metrics.MetricModels(str(model_dirs[0]), str(model_dirs[1]), device="cpu", batch_size=1)
    (alone,) = evaluate.evaluate([run], one_by_one, lpips=False, gram=True)
    for a, b in zip(together.rows, alone.rows):
        assert a.scores.keys() == b.scores.keys()
        for metric in a.scores:
            assert a.scores[metric] == pytest.approx(b.scores[metric], rel=1e-5, abs=1e-7)
