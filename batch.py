"""`cross-image-attention batch`: the transfer of every pair of a CSV manifest, resumable, on one or many processes.

    cross-image-attention batch --manifest pairs.csv
    accelerate launch --multi_gpu --num_processes 4 -m cross_image_attention.batch --manifest pairs.csv

The manifest has a header row with the columns `appearance`, `structure` and `domain_name`, and optionally any of
`OPTIONAL_COLUMNS`, whose non-empty cells replace the global option of the same name for that row. Image paths are
relative to the manifest's folder. Every other option of the single-pair command line applies to all pairs.

Row `i` is written to its own folder `OUTPUT_PATH/{i:04d}_{appearance stem}__{structure stem}` (`transfer.png`,
`strip.png`, `config.json`, then a `done` marker holding a hash of the row and the options); a folder whose marker
matches is skipped, so a re-run resumes. A failed row leaves `error.txt` there and the others go on. Inversions
are cached in `--cache_dir` under the single-pair command's keys and reused across pairs and runs.

Under `accelerate launch` each process takes its share of the rows with `PartialState.split_between_processes` on
its own device; the main process prints the summary and writes it to `OUTPUT_PATH/summary.json`.
"""

import argparse
import contextlib
import csv
import hashlib
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import accelerate
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm
from tqdm.contrib import DummyTqdmFile

from .cli import (
    build_parser,
    check_device,
    check_model,
    check_settings,
    load_pipeline,
    parse_bool,
    read_image,
    transfer_pair,
    write_atomically,
)
from .pipeline_cross_image import CrossImageAttentionPipeline

REQUIRED_COLUMNS = ("appearance", "structure", "domain_name")
# Per-row values of the single-pair options of the same name, with their types there.
OPTIONAL_COLUMNS = {
    "prompt": str,
    "object_noun": str,
    "seed": int,
    "num_timesteps": int,
    "skip_steps": int,
    "swap_guidance_scale": float,
    "contrast_strength": float,
    "use_masked_adain": parse_bool,
}
# Single-pair options that a batch takes from the manifest (or fixes), refused on its command line.
REFUSED_OPTIONS = {
    "app_image_path": "the manifest's appearance column gives it",
    "struct_image_path": "the manifest's structure column gives it",
    "domain_name": "the manifest's domain_name column gives it",
    "prompt": "the manifest's prompt column gives it",
    "object_noun": "the manifest's object_noun column gives it",
    "load_latents": "a batch always reuses cached inversions",
}
DONE_MARKER = "done"
ERROR_FILE = "error.txt"


@dataclass
class Pair:
    """One manifest row: its index among the rows and its cells by column (empty cells left out)."""

    index: int
    cells: dict[str, str]

    @property
    def name(self) -> str:
        """The output folder's name: unique by the index, readable by the image file names."""
        stems = [_safe_stem(self.cells.get(column, "")) for column in ("appearance", "structure")]
        return f"{self.index:04d}_{stems[0]}__{stems[1]}"


def _safe_stem(path: str) -> str:
    """The file name without suffix, restricted to characters that are safe in a folder name on any system."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._")
    return stem[:40] or "none"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """`--manifest` and the single-pair command line's global options (argparse exits with status 2 on errors)."""
    parser = argparse.ArgumentParser(
        prog="cross-image-attention batch",
        usage="%(prog)s --manifest CSV [options of cross-image-attention]",
        description="Appearance transfer for every row of a CSV manifest with the columns "
        f"{', '.join(REQUIRED_COLUMNS)} (image paths relative to the manifest's folder). Row N is written to "
        "OUTPUT_PATH/NNNN_APPEARANCE__STRUCTURE; rows already done are skipped. Under `accelerate launch` the "
        "processes share the rows.",
        epilog="All other options of `cross-image-attention` (run `cross-image-attention --help`) apply to every "
        f"pair, except {', '.join('--' + name for name in REFUSED_OPTIONS)}. The manifest's optional columns "
        f"{', '.join(OPTIONAL_COLUMNS)} set those options per row.",
        allow_abbrev=False,  # or `--m` would be taken for --manifest instead of being ambiguous for the options
    )
    parser.add_argument("--manifest", type=Path, required=True, help="CSV file of the pairs")
    args, rest = parser.parse_known_args(argv)

    options_parser = build_parser()
    options_parser.prog = parser.prog
    # None marks what was not given: refused options, and a device left to accelerate.
    options_parser.set_defaults(device=None, **dict.fromkeys(REFUSED_OPTIONS))
    options = options_parser.parse_args(rest)
    for name, reason in REFUSED_OPTIONS.items():
        if getattr(options, name) is not None:
            options_parser.error(f"--{name} is not a batch option: {reason}")
    options.manifest = args.manifest
    return options


def read_manifest(path: Path) -> list[Pair]:
    """The manifest's rows; a missing file or a missing, unknown or repeated column is an error for all rows."""
    if not path.is_file():
        raise ValueError(f"--manifest: no such file: {path}")
    # utf-8-sig: spreadsheets often save CSV with a byte order mark, which would otherwise join the first column.
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = [column.strip() for column in next(reader, [])]
        rows = [row for row in reader if any(cell.strip() for cell in row)]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    unknown = [column for column in header if column not in REQUIRED_COLUMNS and column not in OPTIONAL_COLUMNS]
    repeated = sorted({column for column in header if header.count(column) > 1})
    for problem, columns in (("missing", missing), ("unknown", unknown), ("repeated", repeated)):
        if columns:
            raise ValueError(
                f"--manifest {path}: {problem} column(s) {', '.join(map(repr, columns))}; the header must have "
                f"{', '.join(REQUIRED_COLUMNS)} and may have {', '.join(OPTIONAL_COLUMNS)}"
            )
    if not rows:
        raise ValueError(f"--manifest {path}: no rows")
    pairs = []
    for index, row in enumerate(rows):
        # Extra cells get the column "" so that the row is refused rather than silently cut.
        cells = {header[i] if i < len(header) else "": cell.strip() for i, cell in enumerate(row)}
        pairs.append(Pair(index, {column: cell for column, cell in cells.items() if cell}))
    return pairs


def pair_options(options: argparse.Namespace, pair: Pair, device: torch.device) -> argparse.Namespace:
    """The single-pair command line's options for a row: the global ones with the row's cells in their place."""
    if "" in pair.cells:
        raise ValueError(f"row {pair.index}: more cells than columns")
    for column in ("appearance", "structure"):
        if column not in pair.cells:
            raise ValueError(f"row {pair.index}: {column}: empty cell")
    values = {}
    for column, kind in OPTIONAL_COLUMNS.items():
        if column in pair.cells:
            try:
                values[column] = kind(pair.cells[column])
            except (ValueError, argparse.ArgumentTypeError):
                raise ValueError(f"row {pair.index}: {column}: invalid value {pair.cells[column]!r}") from None
    folder = options.manifest.parent
    return argparse.Namespace(
        **{
            **vars(options),
            **values,
            "app_image_path": folder / pair.cells["appearance"],
            "struct_image_path": folder / pair.cells["structure"],
            "domain_name": pair.cells.get("domain_name"),
            "output_path": options.output_path / pair.name,
            "load_latents": True,
            "device": str(device),
        }
    )


def fingerprint(options: argparse.Namespace, pair: Pair) -> str:
    """A hash of the row's cells and of the options that change results, for the `done` marker.

    The cells are hashed as written and the folders left out, so that moved folders still resume; so is the
    device.
    """
    ignored = ("manifest", "output_path", "cache_dir", "device")
    settings = {name: value for name, value in vars(options).items() if name not in ignored}
    payload = json.dumps({"cells": pair.cells, "options": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def numerics(device: torch.device, dtype: str) -> dict:
    """What a row's numbers depend on besides its inputs and options, for its `config.json`.

    The same inputs give the same bytes only on the same device (and GPU model), dtype and number of torch threads
    (CPU reductions are split by thread), with the same library versions (`config.json` has the main ones).
    """
    info = {
        "device": str(device),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "machine": platform.machine(),
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def run_pair(pipe: CrossImageAttentionPipeline, options: argparse.Namespace, extra_config: dict) -> None:
    """Invert (or load) the pair, transfer, and write the outputs as the single-pair command does."""
    paths = (options.app_image_path, options.struct_image_path)
    images = (read_image(paths[0], "appearance"), read_image(paths[1], "structure"))
    # A batch always reuses cached inversions, so one appearance against many structures is inverted once.
    transfer_pair(pipe, options, paths, images, options.domain_name, options.cache_dir, True, extra_config)


def process_pair(
    pipe: CrossImageAttentionPipeline,
    options: argparse.Namespace,
    pair: Pair,
    device: torch.device,
    process_index: int,
) -> dict:
    """Run one row unless its folder is done; any error fails this row only. Returns the row's summary entry."""
    folder = options.output_path / pair.name
    marker = folder / DONE_MARKER
    key = fingerprint(options, pair)
    entry = {"row": pair.index, "folder": pair.name, "process_index": process_index, "error": None}
    if marker.is_file() and marker.read_text().strip() == key:
        return {**entry, "status": "skipped"}
    start = time.perf_counter()
    try:
        pair_args = pair_options(options, pair, device)
        check_settings(pair_args, pair_args.domain_name)
        folder.mkdir(parents=True, exist_ok=True)
        # A changed row runs again: its old marker and error must not outlive the new attempt.
        marker.unlink(missing_ok=True)
        (folder / ERROR_FILE).unlink(missing_ok=True)
        run_pair(pipe, pair_args, {"process_index": process_index, "numerics": numerics(device, options.dtype)})
        write_atomically(marker, lambda path: Path(path).write_text(key + "\n"))
    except Exception as error:  # any failure, a model's included, fails this row only
        message = " ".join(f"{error}".split()) or type(error).__name__
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ERROR_FILE).write_text(f"{message}\n\n{traceback.format_exc()}")
        tqdm.write(f"error: {pair.name}: {message}", file=sys.stderr)  # above the progress bar
        return {**entry, "status": "failed", "error": message}
    return {**entry, "status": "done", "seconds": round(time.perf_counter() - start, 3)}


def summarize(results: list[dict], output_path: Path) -> None:
    """Print the counts and the failed rows, and write them all to `summary.json`."""
    counts = {status: sum(r["status"] == status for r in results) for status in ("done", "skipped", "failed")}
    (output_path / "summary.json").write_text(json.dumps({**counts, "pairs": results}, indent=2) + "\n")
    print(f"{len(results)} pairs: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    for result in results:
        if result["status"] == "failed":
            print(f"  failed {result['folder']}: {result['error']}")
    print(f"Summary in {output_path / 'summary.json'}")


def check_process_group(state: PartialState) -> None:
    """Refuse processes launched together that accelerate did not join, or each would run every row."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise ValueError(
            f"{launched} processes were launched but accelerate joined them in no process group (no GPU?); for "
            "processes on CPUs set ACCELERATE_USE_CPU=true"
        )


def print_error(error: Exception) -> None:
    """One `error:` line, also for the multi-line messages of some libraries."""
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the batch; returns 0, or 1 if the setup or any row failed."""
    options = parse_args(argv)
    if options.cache_dir is None:
        options.cache_dir = options.output_path / "inversions"
    # `accelerate launch --cpu` (and CPU process groups, see the README) say so in the environment, which an
    # `Accelerator` reads but a bare `PartialState` does not.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    # The options and the manifest are the same for every process: only the main process reports their errors.
    try:
        check_process_group(state)
        # The domain is per row: a placeholder passes its check here, rows are checked with their own.
        check_settings(options, domain_name="(per row)")
        check_model(options.model)
        pairs = read_manifest(options.manifest)
    except (ValueError, OSError) as error:
        if state.is_main_process:
            print_error(error)
        return 1
    # The device and the model can fail on one process only: each reports its own error.
    try:
        device = check_device(options.device) if options.device is not None else state.device
        for folder in (options.output_path, options.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)
        pipe = load_pipeline(options.model, device, options.dtype)
    except (ValueError, TypeError, OSError) as error:
        print_error(error)
        return 1
    pipe.set_progress_bar_config(disable=True)  # one bar over the pairs instead

    results = []
    with state.split_between_processes(pairs) as share:
        bar = tqdm(share, desc="pairs", unit="pair", disable=not state.is_local_main_process)
        # The single-pair helpers print progress lines; through tqdm they do not break the bar.
        with contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)):
            for pair in bar:
                bar.set_postfix_str(pair.name)
                results.append(process_pair(pipe, options, pair, device, state.process_index))
    results = sorted(gather_object(results), key=lambda result: result["row"])
    if state.is_main_process:
        summarize(results, options.output_path)
    return int(any(result["status"] == "failed" for result in results))


if __name__ == "__main__":
    sys.exit(main())
