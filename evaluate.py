"""`cross-image-attention evaluate RUN [RUN ...]`: the papers' metrics over every finished row of runs.

    cross-image-attention evaluate runs/a             # runs/a/metrics.csv, metrics.json, metrics.png, a table
    cross-image-attention evaluate runs/a runs/b      # the same for each, and side by side: runs/a/comparison.*

A RUN is what `cross-image-attention batch` writes (one folder per row) or what the single-pair command writes (a
folder with `config.json` itself). Each row's `config.json` says which technique made it (`kind`), where its inputs
and output are and with which prompts; the kind decides the metrics (see `metrics.py` for their definitions):

| kind                  | metrics                                                                                |
|-----------------------|----------------------------------------------------------------------------------------|
| `appearance_transfer` | `structure_distance` to the structure image, `dino_similarity` to the appearance image |
| `editing`             | `structure_distance` to the source, `clip_score` of the target prompt, `lpips`,        |
|                       | `psnr`, `ssim`, `mse` against the source; with a mask also `clip_score_edited` and     |
|                       | `*_outside_mask` (PIE-Bench's protocol)                                                |
| `style`               | `dino_similarity` to the style reference, `clip_score` of the prompt                   |

`--gram` adds `gram_distance` to the appearance or style image. Rows are matched by folder name across runs.

## The `config.json` contract of a row

- `kind`: "appearance_transfer", "editing" or "style". Absent means "appearance_transfer" (what this package's
  commands write today).
- `output_image` (optional): the output's file name in the row folder; default `transfer.png` for appearance
  transfer, `output.png` for the other kinds.
- Input image paths, absolute or relative to the directory the command ran in (`--inputs_root` resolves them
  against another directory):
  - appearance_transfer: `struct_image_path`, `app_image_path` (and `prompt`, recorded, not scored);
  - editing: `source_image_path`, `target_prompt` (and `source_prompt`, recorded), optionally `mask_path`: an
    image of the edited region, white inside;
  - style: `style_image_path`, `prompt`.
- A row is finished when `config.json` and the output exist and there is no `error.txt` (its first line says why
  the row failed). In a batch run (a `summary.json` or any row's `done` marker, or `process_index` in the row's
  config) a row is finished only with its `done` marker, which `batch` writes last. Other rows are listed, not
  scored.

Differently sized images are resized as `metrics.py` documents (the output to the reference's size).
"""

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from tqdm.auto import tqdm

from . import metrics
from .cli import check_device

CONFIG_FILE = "config.json"
DONE_MARKER = "done"
ERROR_FILE = "error.txt"
SUMMARY_FILE = "summary.json"
# Folders of a run that are not rows.
NOT_ROWS = ("inversions",)
BATCH_ROW_NAME = re.compile(r"\d{4,}_")
LPIPS_CHOICES = (*metrics.LPIPS_NETS, "none")


@dataclass(frozen=True)
class Metric:
    """A column of `metrics.csv`: whether lower or higher is better, and what it measures."""

    direction: str
    description: str


METRICS = {
    "structure_distance": Metric("lower", "DINO ViT-B/8 self-similarity distance to the structure/source (Splice)"),
    "dino_similarity": Metric("higher", "DINO ViT-B/8 CLS cosine similarity to the appearance/style image (DINO-I)"),
    "gram_distance": Metric("lower", "Gram-matrix distance of DINO tokens to the appearance/style image"),
    "clip_score": Metric("higher", "CLIP ViT-L/14 score of the output and its prompt, 100 max(cos, 0)"),
    "clip_score_edited": Metric("higher", "CLIP score of the edited region (output x mask) and the target prompt"),
    "lpips": Metric("lower", "LPIPS to the source image"),
    "psnr": Metric("higher", "PSNR to the source image, dB"),
    "ssim": Metric("higher", "SSIM to the source image"),
    "mse": Metric("lower", "mean squared error to the source image, range [0, 1]"),
    "lpips_outside_mask": Metric("lower", "LPIPS to the source, both multiplied by 1 - mask"),
    "psnr_outside_mask": Metric("higher", "PSNR to the source, both multiplied by 1 - mask, dB"),
    "ssim_outside_mask": Metric("higher", "SSIM to the source, both multiplied by 1 - mask"),
    "mse_outside_mask": Metric("lower", "mean squared error to the source, both multiplied by 1 - mask"),
}
PIXEL_METRICS = ("lpips", "psnr", "ssim", "mse")


@dataclass(frozen=True)
class Kind:
    """What a technique's rows record and how they are scored.

    Args:
        images: Input roles and the `config.json` keys of their paths (all required).
        prompts: Prompt roles and their `config.json` keys (all required).
        output: The output's default file name.
        plan: `(metric, role)` pairs: the metric between the output and that image role (or prompt role).
        mask: The `config.json` key of an optional mask of the edited region.
    """

    images: dict[str, str]
    prompts: dict[str, str]
    output: str
    plan: tuple[tuple[str, str], ...]
    mask: str | None = None


KINDS = {
    "appearance_transfer": Kind(
        images={"structure": "struct_image_path", "appearance": "app_image_path"},
        prompts={},
        output="transfer.png",
        plan=(("structure_distance", "structure"), ("dino_similarity", "appearance"), ("gram_distance", "appearance")),
    ),
    "editing": Kind(
        images={"source": "source_image_path"},
        prompts={"target_prompt": "target_prompt"},
        output="output.png",
        plan=(
            ("structure_distance", "source"),
            ("clip_score", "target_prompt"),
            ("clip_score_edited", "target_prompt"),
            *((name, "source") for name in PIXEL_METRICS),
            *((f"{name}_outside_mask", "source") for name in PIXEL_METRICS),
        ),
        mask="mask_path",
    ),
    "style": Kind(
        images={"style": "style_image_path"},
        prompts={"prompt": "prompt"},
        output="output.png",
        plan=(("dino_similarity", "style"), ("clip_score", "prompt"), ("gram_distance", "style")),
    ),
}
DEFAULT_KIND = "appearance_transfer"


@dataclass
class Row:
    """A finished row: its folder, settings, inputs and output."""

    name: str
    folder: Path
    kind: str
    config: dict
    output: Path
    images: dict[str, Path]
    prompts: dict[str, str]
    mask: Path | None = None
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """A run folder's scored rows and the rows it could not score, with why."""

    path: Path
    rows: list[Row]
    unscored: list[tuple[str, str]]


# Reading runs ---------------------------------------------------------------------------------------------------


def _first_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(unreadable)"
    return lines[0] if lines else "(empty)"


def resolve_input(value: str, inputs_root: Path | None) -> Path:
    """A recorded input path: absolute as is, relative against `inputs_root` (default: the current directory)."""
    path = Path(value).expanduser()
    if path.is_absolute() or inputs_root is None:
        return path
    return inputs_root / path


def read_row(folder: Path, name: str, needs_done: bool, inputs_root: Path | None) -> Row | str:
    """The row in `folder`, or why it cannot be scored."""
    if (folder / ERROR_FILE).is_file():
        return f"failed: {_first_line(folder / ERROR_FILE)}"
    if not (folder / CONFIG_FILE).is_file():
        return f"not finished: no {CONFIG_FILE}"
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"cannot score: {CONFIG_FILE}: {error}"
    if not isinstance(config, dict):
        return f"cannot score: {CONFIG_FILE} is not a JSON object"
    if (needs_done or "process_index" in config) and not (folder / DONE_MARKER).is_file():
        return f"not finished: no {DONE_MARKER} marker"
    kind_name = config.get("kind", DEFAULT_KIND)
    if kind_name not in KINDS:
        return f"cannot score: unknown kind {kind_name!r} (expected one of {', '.join(KINDS)})"
    kind = KINDS[kind_name]
    output = folder / str(config.get("output_image", kind.output))
    if not output.is_file():
        return f"not finished: no {output.name}"
    images = {}
    for role, key in kind.images.items():
        if not isinstance(config.get(key), str):
            return f"cannot score: {CONFIG_FILE} has no {key}"
        images[role] = resolve_input(config[key], inputs_root)
        if not images[role].is_file():
            return f"cannot score: {role} image not found: {images[role]}"
    prompts = {}
    for role, key in kind.prompts.items():
        if not isinstance(config.get(key), str):
            return f"cannot score: {CONFIG_FILE} has no {key}"
        prompts[role] = config[key]
    mask = None
    if kind.mask is not None and config.get(kind.mask):
        mask = resolve_input(str(config[kind.mask]), inputs_root)
        if not mask.is_file():
            return f"cannot score: mask not found: {mask}"
    return Row(name, folder, kind_name, config, output, images, prompts, mask)


def read_run(path: Path, inputs_root: Path | None = None) -> Run:
    """The rows of a run folder: the folder itself when it has a `config.json`, else its row folders.

    Args:
        path: A folder written by `batch` or by the single-pair command.
        inputs_root: The directory that relative input paths are relative to (default: the current directory).
    """
    if not path.exists():
        raise ValueError(f"{path}: no such folder")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder")
    if (path / CONFIG_FILE).is_file():
        row = read_row(path, path.resolve().name, (path / DONE_MARKER).is_file(), inputs_root)
        return Run(path, [row], []) if isinstance(row, Row) else Run(path, [], [(path.resolve().name, row)])
    folders = sorted(
        entry
        for entry in path.iterdir()
        if entry.is_dir()
        and entry.name not in NOT_ROWS
        and not entry.name.startswith(".")
        and (
            BATCH_ROW_NAME.match(entry.name)
            or any((entry / name).exists() for name in (CONFIG_FILE, DONE_MARKER, ERROR_FILE))
        )
    )
    summary = _read_summary(path / SUMMARY_FILE)
    if not folders and not summary:
        raise ValueError(f"{path}: not a run folder (no {CONFIG_FILE} and no row folders)")
    is_batch = summary is not None or any((folder / DONE_MARKER).is_file() for folder in folders)
    run = Run(path, [], [])
    for folder in folders:
        row = read_row(folder, folder.name, is_batch, inputs_root)
        if isinstance(row, Row):
            run.rows.append(row)
        else:
            run.unscored.append((folder.name, row))
    names = {folder.name for folder in folders}
    for entry in summary or []:
        if isinstance(entry, dict) and isinstance(entry.get("folder"), str) and entry["folder"] not in names:
            run.unscored.append((entry["folder"], "not finished: no folder"))
    return run


def _read_summary(path: Path) -> list | None:
    """The rows listed in `batch`'s `summary.json` ([] when it has none or cannot be read; None without one)."""
    if not path.is_file():
        return None
    try:
        pairs = json.loads(path.read_text()).get("pairs", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    return pairs if isinstance(pairs, list) else []


# Scoring --------------------------------------------------------------------------------------------------------


class Scorer:
    """Scores rows with one set of models, in batches; keeps small embeddings of images and prompts seen before.

    Args:
        models: The models of the metrics.
        lpips: Whether to compute LPIPS (the pixel metrics PSNR, SSIM and MSE are always computed for editing).
        gram: Whether to compute `gram_distance`.
    """

    def __init__(self, models: metrics.MetricModels, lpips: bool = True, gram: bool = False):
        self.models = models
        self.lpips = lpips
        self.gram = gram
        self._cls: dict[Path, torch.Tensor] = {}
        self._text: dict[str, torch.Tensor] = {}

    def applies(self, row: Row, metric: str) -> bool:
        """Whether `metric` is computed for `row`."""
        if metric == "gram_distance":
            return self.gram
        if metric.startswith("lpips"):
            return self.lpips and (row.mask is not None or not metric.endswith("_outside_mask"))
        if metric.endswith("_outside_mask") or metric == "clip_score_edited":
            return row.mask is not None
        return True

    def score(self, rows: list[Row]) -> list[str | None]:
        """Fill each row's `scores`; returns per row None, or why it could not be scored (an unreadable image, an
        image too small for SSIM)."""
        loaded: dict[int, dict] = {}
        problems: list[str | None] = [None] * len(rows)
        for index, row in enumerate(rows):
            try:
                images = {role: self._load(path) for role, path in row.images.items()}
                images["output"] = self._load(row.output)
                if row.mask is not None:
                    with PIL.Image.open(row.mask) as mask:
                        images["mask"] = metrics.to_mask(mask, tuple(images["output"].shape[-2:]))
                loaded[index] = images
            except (OSError, ValueError) as error:
                problems[index] = f"cannot score: {' '.join(str(error).split())}"
        jobs = [
            (index, metric, role)
            for index, row in enumerate(rows)
            if index in loaded
            for metric, role in KINDS[row.kind].plan
            if self.applies(row, metric)
        ]
        self._structure([job for job in jobs if job[1] == "structure_distance"], rows, loaded)
        self._dino_similarity([job for job in jobs if job[1] == "dino_similarity"], rows, loaded)
        self._gram([job for job in jobs if job[1] == "gram_distance"], rows, loaded)
        self._clip([job for job in jobs if job[1].startswith("clip_score")], rows, loaded)
        for index, metric, role in jobs:
            name = metric.removesuffix("_outside_mask")
            if name not in PIXEL_METRICS or problems[index] is not None:
                continue
            images = loaded[index]
            # The mask is at the output's size; the metrics resize it to the source's.
            mask = images["mask"][0] if metric.endswith("_outside_mask") else None
            try:
                if name == "lpips":
                    value = metrics.lpips_distance(images[role], images["output"], self.models, mask=mask)
                else:
                    value = getattr(metrics, name)(images[role], images["output"], mask=mask)
            except ValueError as error:  # e.g. an image too small for SSIM
                problems[index] = f"cannot score: {metric}: {' '.join(str(error).split())}"
                continue
            rows[index].scores[metric] = value
        for row in rows:
            row.scores = {metric: row.scores[metric] for metric in METRICS if metric in row.scores}
        return problems

    @staticmethod
    def _load(path: Path) -> torch.Tensor:
        try:
            with PIL.Image.open(path) as image:
                return metrics.to_tensor(image.convert("RGB"))
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise OSError(f"cannot read the image {path}: {error}") from None

    def _structure(self, jobs: list, rows: list[Row], loaded: dict) -> None:
        images = []
        for index, _, role in jobs:
            reference = loaded[index][role]
            images += [reference, metrics.resize(loaded[index]["output"], reference.shape[-2:])]
        similarities = self.models.dino_self_similarity(images) if images else []
        for number, (index, metric, _) in enumerate(jobs):
            first, second = similarities[2 * number], similarities[2 * number + 1]
            rows[index].scores[metric] = metrics.self_similarity_distance(first, second)

    def _dino_similarity(self, jobs: list, rows: list[Row], loaded: dict) -> None:
        wanted = {}
        for index, _, role in jobs:
            wanted[rows[index].images[role]] = loaded[index][role]
            wanted[rows[index].output] = loaded[index]["output"]
        missing = [path for path in wanted if path not in self._cls]
        if missing:
            for path, embedding in zip(missing, self.models.dino_cls([wanted[path] for path in missing])):
                self._cls[path] = embedding.cpu()
        for index, metric, role in jobs:
            rows[index].scores[metric] = metrics.cosine(
                self._cls[rows[index].images[role]], self._cls[rows[index].output]
            )

    def _gram(self, jobs: list, rows: list[Row], loaded: dict) -> None:
        images = [image for index, _, role in jobs for image in (loaded[index][role], loaded[index]["output"])]
        grams = self.models.dino_gram(images) if images else []
        for number, (index, metric, _) in enumerate(jobs):
            rows[index].scores[metric] = metrics.gram_matrices_distance(grams[2 * number], grams[2 * number + 1])

    def _clip(self, jobs: list, rows: list[Row], loaded: dict) -> None:
        images = []
        for index, metric, _ in jobs:
            output = loaded[index]["output"]
            images.append(output * loaded[index]["mask"] if metric == "clip_score_edited" else output)
        prompts = [rows[index].prompts[role] for index, _, role in jobs]
        missing = list(dict.fromkeys(prompt for prompt in prompts if prompt not in self._text))
        if missing:
            for prompt, embedding in zip(missing, self.models.clip_text_embeddings(missing)):
                self._text[prompt] = embedding.cpu()
        embeddings = self.models.clip_image_embeddings(images).cpu() if images else []
        for (index, metric, _), embedding, prompt in zip(jobs, embeddings, prompts):
            rows[index].scores[metric] = metrics.clip_score_from_embeddings(embedding, self._text[prompt])


def score_run(run: Run, scorer: Scorer, batch_size: int) -> None:
    """Score every row of `run` in chunks of `batch_size` rows, with a progress bar; rows whose images cannot be
    read move to `run.unscored`."""
    kept = []
    with tqdm(total=len(run.rows), desc=f"scoring {run.path}", unit="row", disable=None) as bar:
        for start in range(0, len(run.rows), batch_size):
            chunk = run.rows[start : start + batch_size]
            for row, problem in zip(chunk, scorer.score(chunk)):
                if problem is None:
                    kept.append(row)
                else:
                    run.unscored.append((row.name, problem))
            bar.update(len(chunk))
    run.rows = kept


# Summaries ------------------------------------------------------------------------------------------------------


def statistics(values: list[float]) -> dict:
    """Mean, standard deviation (population), min, max and count. An infinite value (the PSNR of identical images)
    makes the mean infinite and the standard deviation None."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "count": 0}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / len(values)) if math.isfinite(mean) else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "count": len(values)}


def run_metrics(run: Run) -> list[str]:
    """The metric columns present in the run's rows, in `METRICS` order."""
    present = {metric for row in run.rows for metric in row.scores}
    return [metric for metric in METRICS if metric in present]


def run_statistics(run: Run) -> dict[str, dict]:
    """Per metric: its direction, description and statistics over the run's rows."""
    return {
        metric: {
            "direction": METRICS[metric].direction,
            "description": METRICS[metric].description,
            **statistics([row.scores[metric] for row in run.rows if metric in row.scores]),
        }
        for metric in run_metrics(run)
    }


def _json_number(value):
    """JSON has no infinity or NaN: they are written as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _json_clean(value):
    if isinstance(value, dict):
        return {key: _json_clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_clean(item) for item in value]
    return _json_number(value)


def format_value(value) -> str:
    """A score for tables: 4 significant digits."""
    if value is None:
        return "-"
    return f"{value:.4g}"


def models_used(scorer: Scorer) -> dict:
    """The models the scores come from, for `metrics.json`."""
    models = scorer.models
    return {
        "dino_model": models.dino_name,
        "clip_model": models.clip_name,
        "lpips_net": models.lpips_name if scorer.lpips else None,
        "gram": scorer.gram,
    }


def write_run_files(run: Run, scorer: Scorer, sheet_rows: int) -> list[Path]:
    """`metrics.csv`, `metrics.json` and `metrics.png` in the run folder."""
    columns = run_metrics(run)
    config_keys = list(dict.fromkeys(key for row in run.rows for key in row.config))
    roles = list(dict.fromkeys(role for row in run.rows for role in row.images))
    header = ["row", "kind", *columns, "output", *(f"{role}_image" for role in roles), "mask"]
    header += [key for key in config_keys if key not in header]
    csv_path = run.path / "metrics.csv"
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        for row in run.rows:
            cells = {"row": row.name, "kind": row.kind, "output": str(row.output), "mask": row.mask or ""}
            cells.update({f"{role}_image": str(path) for role, path in row.images.items()})
            cells.update({metric: repr(value) for metric, value in row.scores.items()})
            for key in config_keys:
                value = row.config.get(key)
                if key not in cells and value is not None:
                    cells[key] = json.dumps(value) if isinstance(value, dict | list) else value
            writer.writerow([cells.get(column, "") for column in header])
    json_path = run.path / "metrics.json"
    document = {
        "run": str(run.path),
        "models": models_used(scorer),
        "metrics": run_statistics(run),
        "rows": [
            {
                "row": row.name,
                "kind": row.kind,
                "scores": row.scores,
                "output": str(row.output),
                "images": {role: str(path) for role, path in row.images.items()},
                "mask": str(row.mask) if row.mask else None,
                "prompts": row.prompts,
                "config": row.config,
            }
            for row in run.rows
        ],
        "unscored": [{"row": name, "reason": reason} for name, reason in run.unscored],
    }
    json_path.write_text(json.dumps(_json_clean(document), indent=2) + "\n")
    png_path = run.path / "metrics.png"
    contact_sheet(run, sheet_rows).save(png_path)
    return [csv_path, json_path, png_path]


def print_run_summary(run: Run) -> None:
    """The rows not scored and a table of the run's metrics."""
    print(f"{run.path}: {len(run.rows)} rows scored, {len(run.unscored)} not scored")
    for name, reason in run.unscored:
        print(f"  {name}: {reason}")
    table = [["metric", "better", "mean", "std", "n"]]
    for metric, stats in run_statistics(run).items():
        table.append(
            [metric, stats["direction"], format_value(stats["mean"]), format_value(stats["std"]), str(stats["count"])]
        )
    print_table(table)


def print_table(table: list[list[str]]) -> None:
    """Columns padded to their widest cell; the first two left-aligned, the numbers right-aligned."""
    widths = [max(len(line[column]) for line in table) for column in range(len(table[0]))]
    for line in table:
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths))
        ]
        print("  " + "  ".join(cells).rstrip())


def run_labels(runs: list[Run]) -> list[str]:
    """Short names of the runs: their folder names when those differ, else the paths as given."""
    names = [run.path.resolve().name or str(run.path) for run in runs]
    return names if len(set(names)) == len(names) else [str(run.path) for run in runs]


def compare(runs: list[Run], output_path: Path, sheet_rows: int) -> list[Path]:
    """Print the runs' means side by side with each run's difference to the first; write `comparison.csv` (per
    row), `comparison.json` and `comparison.png` (histograms and a side-by-side sheet) to `output_path`."""
    labels = run_labels(runs)
    statistics_by_run = [run_statistics(run) for run in runs]
    names = [metric for metric in METRICS if any(metric in stats for stats in statistics_by_run)]
    header = ["metric", "better", *labels, *(f"{label} - {labels[0]}" for label in labels[1:])]
    table = [header]
    summary = {}
    for metric in names:
        means = [stats.get(metric, {}).get("mean") for stats in statistics_by_run]
        differences = [
            None if mean is None or means[0] is None else mean - means[0] for mean in means[1:]
        ]  # fmt: skip
        direction = METRICS[metric].direction
        table.append(
            [metric, direction, *map(format_value, means), *(_signed(diff, direction) for diff in differences)]
        )
        summary[metric] = {
            "direction": METRICS[metric].direction,
            "means": dict(zip(labels, means)),
            "differences": {f"{label} - {labels[0]}": diff for label, diff in zip(labels[1:], differences)},
        }
    print("Comparison (means; differences to the first run):")
    print_table(table)

    by_name = [{row.name: row for row in run.rows} for run in runs]
    shared = [name for name in by_name[0] if all(name in rows for rows in by_name[1:])]
    for metric in names:
        # The mean over the rows scored in both runs of each row's difference.
        summary[metric]["paired"] = {}
        for label, rows in zip(labels[1:], by_name[1:]):
            paired = [
                rows[name].scores[metric] - by_name[0][name].scores[metric]
                for name in shared
                if metric in rows[name].scores and metric in by_name[0][name].scores
            ]
            summary[metric]["paired"][f"{label} - {labels[0]}"] = {
                "rows": len(paired),
                "mean_difference": sum(paired) / len(paired) if paired else None,
            }

    output_path.mkdir(parents=True, exist_ok=True)
    csv_path = output_path / "comparison.csv"
    columns = [f"{metric}:{label}" for metric in names for label in labels]
    columns += [f"{metric}:{label} - {labels[0]}" for metric in names for label in labels[1:]]
    with open(csv_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["row", *columns])
        for name in shared:
            cells = {}
            for metric in names:
                values = [rows[name].scores.get(metric) for rows in by_name]
                for label, value in zip(labels, values):
                    cells[f"{metric}:{label}"] = value
                for label, value in zip(labels[1:], values[1:]):
                    if value is not None and values[0] is not None:
                        cells[f"{metric}:{label} - {labels[0]}"] = value - values[0]
            writer.writerow([name, *(repr(cells[c]) if cells.get(c) is not None else "" for c in columns)])
    json_path = output_path / "comparison.json"
    document = {"runs": dict(zip(labels, (str(run.path) for run in runs))), "metrics": summary, "shared_rows": shared}
    json_path.write_text(json.dumps(_json_clean(document), indent=2) + "\n")
    png_path = output_path / "comparison.png"
    comparison_sheet(runs, labels, names, shared, sheet_rows).save(png_path)
    return [csv_path, json_path, png_path]


def _signed(value, direction: str) -> str:
    """A difference with whether it is an improvement for a metric of that direction."""
    if value is None or not math.isfinite(value):
        return "-" if value is None else f"{value:+}"
    if value == 0:
        return "0 (same)"
    better = (value < 0) == (direction == "lower")
    return f"{value:+.4g} ({'better' if better else 'worse'})"


# Pictures (Pillow only) -----------------------------------------------------------------------------------------

THUMB = 160
PAD = 8
TEXT_WIDTH = 460
LINE = 14
BACKGROUND = (255, 255, 255)
PANEL = (235, 235, 235)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font():
    return PIL.ImageFont.load_default()


def _thumbnail(path: Path) -> PIL.Image.Image:
    """The image fitted into a THUMB x THUMB grey square (a grey square with a cross if it cannot be read)."""
    tile = PIL.Image.new("RGB", (THUMB, THUMB), PANEL)
    try:
        with PIL.Image.open(path) as image:
            image = image.convert("RGB")
            scale = THUMB / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, PIL.Image.Resampling.BICUBIC)
            tile.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
    except (OSError, ValueError):
        draw = PIL.ImageDraw.Draw(tile)
        draw.line((0, 0, THUMB, THUMB), fill=MUTED)
        draw.line((0, THUMB, THUMB, 0), fill=MUTED)
    return tile


def _sheet(title: list[str], lines: list[tuple[list[tuple[str, Path]], list[str]]], footer: list[str]):
    """A picture of lines of labelled thumbnails, each with text to its right, under a title."""
    panels = max((len(panels) for panels, _ in lines), default=0)
    width = PAD + panels * (THUMB + PAD) + TEXT_WIDTH
    heights = [max(LINE + THUMB if panels_ else 0, LINE * len(text)) + PAD for panels_, text in lines]
    height = PAD + LINE * len(title) + PAD + sum(heights) + LINE * len(footer) + PAD
    sheet = PIL.Image.new("RGB", (width, height), BACKGROUND)
    draw, font = PIL.ImageDraw.Draw(sheet), _font()
    y = PAD
    for text in title:
        draw.text((PAD, y), text, fill=INK, font=font)
        y += LINE
    y += PAD
    for (panels_, text), line_height in zip(lines, heights):
        x = PAD
        for label, path in panels_:
            draw.text((x, y), label, fill=MUTED, font=font)
            sheet.paste(_thumbnail(path), (x, y + LINE))
            x += THUMB + PAD
        x = PAD + panels * (THUMB + PAD)
        for number, words in enumerate(text):
            draw.text((x, y + number * LINE), words, fill=INK if number == 0 else MUTED, font=font)
        y += line_height
    for text in footer:
        draw.text((PAD, y), text, fill=MUTED, font=font)
        y += LINE
    return sheet


def _score_lines(scores: dict[str, float]) -> list[str]:
    return [
        f"{metric} {format_value(value)} ({METRICS[metric].direction} is better)" for metric, value in scores.items()
    ]


def contact_sheet(run: Run, sheet_rows: int) -> PIL.Image.Image:
    """The inputs and output of the run's first `sheet_rows` rows with their scores."""
    stats = run_statistics(run)
    title = [f"{run.path}: {len(run.rows)} rows scored, {len(run.unscored)} not scored"]
    title += [
        f"mean {metric} {format_value(values['mean'])} ({values['direction']} is better)"
        for metric, values in stats.items()
    ]
    lines = [
        (
            [*row.images.items(), *([("mask", row.mask)] if row.mask else []), ("output", row.output)],
            [row.name, row.kind, *_score_lines(row.scores)],
        )
        for row in run.rows[:sheet_rows]
    ]
    footer = [f"first {sheet_rows} of {len(run.rows)} rows; all in metrics.csv"] if len(run.rows) > sheet_rows else []
    return _sheet(title, lines, footer)


def _histogram(metric: str, runs: list[Run], labels: list[str], width: int = 440, height: int = 200):
    """Per-run histograms of one metric on shared bins, with each run's mean as a vertical line."""
    panel = PIL.Image.new("RGB", (width, height), BACKGROUND)
    draw, font = PIL.ImageDraw.Draw(panel), _font()
    draw.text((4, 2), f"{metric} ({METRICS[metric].direction} is better)", fill=INK, font=font)
    values = [
        [row.scores[metric] for row in run.rows if math.isfinite(row.scores.get(metric, math.nan))] for run in runs
    ]
    every = [value for run_values in values for value in run_values]
    left, right, top, bottom = 10, width - 10, LINE + 6, height - LINE - 4
    draw.rectangle((left, top, right, bottom), outline=PANEL)
    if not every:
        draw.text((left + 4, top + 4), "no finite values", fill=MUTED, font=font)
        return panel
    low, high = min(every), max(every)
    span = (high - low) or (abs(high) or 1.0)
    low, high = (low, high) if high > low else (low - span / 2, high + span / 2)
    bins = 12
    counts = [[0] * bins for _ in runs]
    for k, run_values in enumerate(values):
        for value in run_values:
            counts[k][min(bins - 1, int((value - low) / (high - low) * bins))] += 1
    tallest = max(max(run_counts) for run_counts in counts) or 1
    bin_width = (right - left) / bins
    bar_width = max(1, int(bin_width / len(runs)) - 1)
    for k, run_counts in enumerate(counts):
        for b, count in enumerate(run_counts):
            if count:
                x0 = left + b * bin_width + k * (bar_width + 1)
                y0 = bottom - (bottom - top - 4) * count / tallest
                draw.rectangle((x0, y0, x0 + bar_width, bottom), fill=COLORS[k % len(COLORS)])
        if values[k]:
            mean = sum(values[k]) / len(values[k])
            x = left + (mean - low) / (high - low) * (right - left)
            draw.line((x, top, x, bottom), fill=COLORS[k % len(COLORS)], width=2)
    draw.text((left, bottom + 2), format_value(low), fill=MUTED, font=font)
    high_text = format_value(high)
    draw.text((right - draw.textlength(high_text, font=font), bottom + 2), high_text, fill=MUTED, font=font)
    return panel


def comparison_sheet(runs: list[Run], labels: list[str], names: list[str], shared: list[str], sheet_rows: int):
    """Histograms per metric (one colour per run, lines at the means), then the shared rows side by side."""
    columns = 2
    histograms = [_histogram(metric, runs, labels) for metric in names]
    legend_height = LINE * len(runs) + PAD
    grid_height = ((len(histograms) + columns - 1) // columns) * (200 + PAD)
    by_name = [{row.name: row for row in run.rows} for run in runs]
    lines = []
    for name in shared[:sheet_rows]:
        first = by_name[0][name]
        panels = [*((role, path) for role, path in first.images.items())]
        panels += [(label, rows[name].output) for label, rows in zip(labels, by_name)]
        text = [name]
        for metric in names:
            values = [rows[name].scores.get(metric) for rows in by_name]
            text.append(f"{metric}: " + "  ".join(f"{label} {format_value(v)}" for label, v in zip(labels, values)))
        lines.append((panels, text))
    footer = [f"first {sheet_rows} of {len(shared)} shared rows"] if len(shared) > sheet_rows else []
    title = ["Rows present in every run, outputs side by side:"] if lines else ["No row is present in every run."]
    rows_sheet = _sheet(title, lines, footer)
    width = max(rows_sheet.width, PAD + columns * (440 + PAD))
    sheet = PIL.Image.new("RGB", (width, legend_height + grid_height + rows_sheet.height), BACKGROUND)
    draw, font = PIL.ImageDraw.Draw(sheet), _font()
    for k, label in enumerate(labels):
        y = PAD // 2 + k * LINE
        draw.rectangle((PAD, y + 2, PAD + 10, y + 12), fill=COLORS[k % len(COLORS)])
        draw.text((PAD + 16, y), f"{label}: {runs[k].path} ({len(runs[k].rows)} rows)", fill=INK, font=font)
    for number, histogram in enumerate(histograms):
        x = PAD + (number % columns) * (440 + PAD)
        y = legend_height + (number // columns) * (200 + PAD)
        sheet.paste(histogram, (x, y))
    sheet.paste(rows_sheet, (0, legend_height + grid_height))
    return sheet


# Command line ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The evaluate command's options (argparse exits with status 2 on errors)."""
    parser = argparse.ArgumentParser(
        prog="cross-image-attention evaluate",
        description="Score every finished row of runs written by `cross-image-attention batch` or the single-pair "
        "command: metrics.csv, metrics.json and metrics.png in each RUN, a table on stdout; with several runs, "
        "their means side by side and comparison.csv/json/png.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder(s)")
    parser.add_argument(
        "--dino_model",
        default=metrics.DEFAULT_DINO_MODEL,
        help=f"DINO ViT: Hub id or local folder (default: {metrics.DEFAULT_DINO_MODEL})",
    )
    parser.add_argument(
        "--clip_model",
        default=metrics.DEFAULT_CLIP_MODEL,
        help=f"CLIP: Hub id or local folder (default: {metrics.DEFAULT_CLIP_MODEL})",
    )
    parser.add_argument(
        "--lpips_net",
        choices=LPIPS_CHOICES,
        default=metrics.DEFAULT_LPIPS_NET,
        help=f"LPIPS backbone for editing rows, or none (default: {metrics.DEFAULT_LPIPS_NET}, as PIE-Bench)",
    )
    parser.add_argument("--gram", action="store_true", help="also compute gram_distance to the appearance/style image")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available, else cpu)",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="rows scored together (default: 16)")
    parser.add_argument(
        "--inputs_root", type=Path, help="resolve relative input paths against this folder (default: the current one)"
    )
    parser.add_argument(
        "--output_path", type=Path, help="folder of the comparison files with several runs (default: the first RUN)"
    )
    parser.add_argument("--sheet_rows", type=int, default=48, help="rows drawn in the .png files (default: 48)")
    return parser.parse_intermixed_args(argv)


def evaluate(
    runs: list[Path],
    models: metrics.MetricModels,
    lpips: bool = True,
    gram: bool = False,
    inputs_root: Path | None = None,
    output_path: Path | None = None,
    sheet_rows: int = 48,
) -> list[Run]:
    """Score the runs, write their files and print their summaries (and the comparison with several runs).

    Args:
        runs: Run folders.
        models: The metrics' models (`models.batch_size` rows are scored together).
        lpips: Whether editing rows get LPIPS.
        gram: Whether rows get `gram_distance`.
        inputs_root: The folder relative input paths are relative to (default: the current directory).
        output_path: The folder of the comparison files (default: the first run).
        sheet_rows: Rows drawn in the pictures.
    """
    if sheet_rows < 0:
        raise ValueError(f"--sheet_rows must be >= 0, got {sheet_rows}")
    resolved = [path.resolve() for path in runs]
    repeated = sorted({str(path) for path, target in zip(runs, resolved) if resolved.count(target) > 1})
    if repeated:
        raise ValueError(f"a run is given more than once: {', '.join(repeated)}")
    read = [read_run(path, inputs_root) for path in runs]
    for run in read:
        if not run.rows:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in run.unscored[:3])
            more = f" (and {len(run.unscored) - 3} more)" if len(run.unscored) > 3 else ""
            raise ValueError(f"{run.path}: no finished row to score: {reasons}{more}")
    scorer = Scorer(models, lpips=lpips, gram=gram)
    for run in read:
        score_run(run, scorer, models.batch_size)
        if not run.rows:
            raise ValueError(f"{run.path}: no row could be scored: {run.unscored[-1][0]}: {run.unscored[-1][1]}")
        print_run_summary(run)
        written = write_run_files(run, scorer, sheet_rows)
        print(f"Wrote {', '.join(map(str, written))}")
    if len(read) > 1:
        written = compare(read, output_path if output_path is not None else read[0].path, sheet_rows)
        print(f"Wrote {', '.join(map(str, written))}")
    return read


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0, or 1 with one `error:` line on stderr."""
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
        device = check_device(args.device)
        models = metrics.MetricModels(
            dino_model=args.dino_model,
            clip_model=args.clip_model,
            lpips_net=metrics.DEFAULT_LPIPS_NET if args.lpips_net == "none" else args.lpips_net,
            device=device,
            batch_size=args.batch_size,
        )
        evaluate(
            args.runs,
            models,
            lpips=args.lpips_net != "none",
            gram=args.gram,
            inputs_root=args.inputs_root,
            output_path=args.output_path,
            sheet_rows=args.sheet_rows,
        )
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
