"""`cross-image-attention batch`: the transfer of every pair of a CSV manifest, resumable, on one or many processes.

    cross-image-attention batch --manifest pairs.csv
    accelerate launch --multi_gpu --num_processes 4 -m cross_image_attention.batch --manifest pairs.csv

The manifest has a header row with the columns `appearance`, `structure` and `domain_name`, and optionally any of
`OPTIONAL_COLUMNS`, whose non-empty cells replace the global option of the same name for that row. Image paths are
relative to the manifest's folder. Every other option of the single-pair command line applies to all pairs.

Each row is written to the folder `OUTPUT_PATH/{appearance stem}__{structure stem}_{key}` (`transfer.png`,
`strip.png`, `config.json`, then a `done` marker holding the key), where the key hashes what determines the outputs:
the row's cells, the options and the bytes of both images; a folder whose marker matches is skipped, so a re-run
resumes, also after rows were inserted, removed or reordered. A finished folder that no row's key names any more (an
image replaced, a row or option edited) is moved to `OUTPUT_PATH/stale/` and reported, as changed when a row with the
same cells remains. A failed row leaves `error.txt` there (when the folder can be written) and
is reported on stderr and in the summary; the others go on. Inversions are cached in `--cache_dir` under the
single-pair command's keys and reused across pairs and runs.

Under `accelerate launch` each process takes its share of the rows with `PartialState.split_between_processes` on
its own device. Before a row runs, its process claims it by creating `claim.json` in the row's folder exclusively
(host, pid, time), so that runs started at once on the same manifest and folders (on one machine or on several
sharing storage) each compute a row once: a row claimed by another live run is left to it and waited for, and a
claim whose owner is gone (same host) or older than `--claim_timeout` is taken over. Every settled row is merged
into `OUTPUT_PATH/summary.json` at once (under a lock, written atomically), so a killed process loses no report of
its finished rows; Ctrl-C or SIGTERM stops a process with one line on stderr and exit status 128 + the signal.
"""

import argparse
import contextlib
import csv
import hashlib
import json
import os
import platform
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import accelerate
import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, parse_flag_from_env
from tqdm.auto import tqdm
from tqdm.contrib import DummyTqdmFile

from .cli import (
    OneLineParser,
    UsageError,
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
CLAIM_FILE = "claim.json"
SUMMARY_FILE = "summary.json"
# Where finished folders that match no row of the manifest go, so that none of them passes for a current output.
STALE_FOLDER = "stale"
# Hex digits of the key in a folder's name: 48 bits, so two rows of one manifest do not share a folder by chance.
NAME_KEY_LENGTH = 12
# A claim older than this is taken over even if its owner may be alive: longer than any row should take, since a
# process on another machine can only be judged by the age of its claim.
DEFAULT_CLAIM_TIMEOUT = 3600.0
# The summary's lock is held for milliseconds: a holder that keeps it longer than this is taken to be stuck or gone.
LOCK_TIMEOUT = 60.0
# How often rows claimed by another run are looked at again, and how often a busy lock is tried again (seconds).
WAIT_INTERVAL = 0.5
LOCK_INTERVAL = 0.05
# Statuses of a row: settled by a run (FINAL), or not (yet): claimed by another run, stopped by a signal, not reached.
FINAL = ("done", "skipped", "failed")
STATUSES = (*FINAL, "claimed", "interrupted", "pending")


@dataclass
class Pair:
    """One manifest row.

    Args:
        index: The row's index among the manifest's rows.
        cells: Its cells by column (empty cells left out).
        images: The sha256 of each image file's bytes by column (None when it cannot be read), set by `key_rows`.
        key: The `fingerprint` of the row, set by `key_rows`.
    """

    index: int
    cells: dict[str, str]
    images: dict[str, str | None] = field(default_factory=dict)
    key: str = ""

    @property
    def name(self) -> str:
        """The output folder's name: named by the key, not the row's position, so that inserting or removing rows
        leaves the other rows' folders as they are; readable by the image file names."""
        stems = [_safe_stem(self.cells.get(column, "")) for column in ("appearance", "structure")]
        return f"{stems[0]}__{stems[1]}_{self.key[:NAME_KEY_LENGTH]}"


def _safe_stem(path: str) -> str:
    """The file name without suffix, restricted to characters that are safe in a folder name on any system."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._")
    return stem[:40] or "none"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """`--manifest` and the single-pair command line's global options; a malformed command line raises `UsageError`
    (one line, as the single-pair command's)."""
    parser = OneLineParser(
        prog="cross-image-attention batch",
        usage="%(prog)s --manifest CSV [options of cross-image-attention]",
        description="Appearance transfer for every row of a CSV manifest with the columns "
        f"{', '.join(REQUIRED_COLUMNS)} (image paths relative to the manifest's folder). Each row is written to "
        "OUTPUT_PATH/APPEARANCE__STRUCTURE_KEY (KEY: a hash of the row, the options and the images); rows already "
        "done are skipped, finished folders of changed rows moved to OUTPUT_PATH/stale. Under `accelerate launch` the "
        "processes share the rows.",
        epilog="All other options of `cross-image-attention` (run `cross-image-attention --help`) apply to every "
        f"pair, except {', '.join('--' + name for name in REFUSED_OPTIONS)}. The manifest's optional columns "
        f"{', '.join(OPTIONAL_COLUMNS)} set those options per row.",
        allow_abbrev=False,  # or `--m` would be taken for --manifest instead of being ambiguous for the options
    )
    parser.add_argument("--manifest", type=Path, required=True, help="CSV file of the pairs")
    parser.add_argument(
        "--claim_timeout",
        type=_positive_seconds,
        default=DEFAULT_CLAIM_TIMEOUT,
        metavar="SECONDS",
        help="take over a row claimed by another run once its claim is this old, even if its owner may be alive "
        f"(default: {DEFAULT_CLAIM_TIMEOUT:g}); a claim whose process is gone on this host is taken over at once",
    )
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
    options.claim_timeout = args.claim_timeout
    return options


def _positive_seconds(text: str) -> float:
    """An argparse type for a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


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
    """A hash of what determines the row's outputs: its cells, the options that change results and the bytes of its
    images (`pair.images`), for its folder's name and its `done` marker.

    The cells are hashed as written and the folders left out, so that moved folders still resume; so is the
    device.
    """
    ignored = ("manifest", "output_path", "cache_dir", "device", "claim_timeout")
    settings = {name: value for name, value in vars(options).items() if name not in ignored}
    payload = json.dumps(
        {"cells": pair.cells, "images": pair.images, "options": settings}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def file_hash(path: Path) -> str | None:
    """The sha256 of a file's bytes; None when it cannot be read (the row then fails when it reads the image)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def key_rows(options: argparse.Namespace, pairs: list[Pair]) -> None:
    """Hash each row's images and set its `images` and `key`; an image shared by many rows is read once.

    Args:
        options: The batch's options (the manifest's folder and the options that change results).
        pairs: The manifest's rows.
    """
    hashes = {}
    for pair in pairs:
        for column in ("appearance", "structure"):
            path = options.manifest.parent / pair.cells.get(column, "")
            if column not in pair.cells:  # the row fails on its empty cell: its folder's key needs no file
                pair.images[column] = None
                continue
            if path not in hashes:
                hashes[path] = file_hash(path)
            pair.images[column] = hashes[path]
        pair.key = fingerprint(options, pair)


def read_marker(marker: Path) -> dict | None:
    """A `done` marker's record (`key`, `cells`, `images`); None when it is missing or unreadable (not done).

    Markers of earlier versions hold the bare key: read as a record without cells.
    """
    try:
        text = marker.read_text()
    except OSError:  # missing, or the folder is not a folder
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"key": text.strip()}
    return record if isinstance(record, dict) else {"key": text.strip()}


def retire_stale(output_path: Path, pairs: list[Pair]) -> dict[int, dict]:
    """Move every finished folder of `output_path` that no row of the manifest names to `output_path/stale/`, with
    one line on stderr each, so that no finished folder there stands for other inputs than its row's.

    Returns what changed for each row whose cells match such a folder's (the same row, its images or options since
    changed), by row index: `was`, where the old outputs went, and `inputs`, the changed images or `options`.

    Args:
        output_path: The batch's output folder.
        pairs: The manifest's rows, keyed.
    """
    current = {pair.name for pair in pairs}
    changed = {}
    try:
        folders = sorted(path for path in output_path.iterdir() if path.name not in current and path.is_dir())
    except OSError:
        return changed
    for folder in folders:
        record = read_marker(folder / DONE_MARKER)
        if record is None:  # not finished: nothing there passes for an output
            continue
        target = output_path / STALE_FOLDER / folder.name
        try:
            target.parent.mkdir(exist_ok=True)
            if target.exists():  # retired before under the same name: keep both
                target = target.with_name(f"{folder.name}.{secrets.token_hex(4)}")
            os.rename(folder, target)
        except FileNotFoundError:  # moved by another run of the same manifest meanwhile
            continue
        except OSError as error:
            print_error(OSError(f"cannot move the stale folder {folder} to {target}: {one_line(error)}"))
            continue
        was = f"{STALE_FOLDER}/{target.name}"
        rows = [pair for pair in pairs if pair.cells == record.get("cells")]
        for pair in rows:
            images = record.get("images") if isinstance(record.get("images"), dict) else {}
            inputs = [f"{column} image" for column in pair.images if images.get(column) != pair.images[column]]
            changed[pair.index] = {"was": was, "inputs": inputs or ["options"]}
            print(f"{pair.name}: {', '.join(inputs or ['options'])} changed since {was} was finished", file=sys.stderr)
        if not rows:
            print(f"{was}: finished for a row no longer in the manifest (moved from {folder.name})", file=sys.stderr)
    return changed


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


def one_line(error: BaseException) -> str:
    """The error's message on one line (some libraries' messages span several), or its type when it has none."""
    return " ".join(f"{error}".split()) or type(error).__name__


class Stopped(BaseException):
    """A stop signal (SIGINT, SIGTERM, SIGHUP), raised in the main thread; like KeyboardInterrupt not an `Exception`,
    so that the handlers that fail one row let it through."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def stop_signals_raise():
    """Raise `Stopped` on Ctrl-C, SIGTERM (torchrun stops the other workers with it when one fails) and SIGHUP while
    the block runs, so that a stopped process still writes its summary; the previous handlers are restored after.
    Signals that are ignored stay ignored (`nohup`, background jobs)."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set in the main thread
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored
                signal.signal(signum, handler)


def ignore_stop_signals() -> None:
    """Ignore further stop signals while a stopped process writes its summary: a terminal's Ctrl-C reaches every
    process of a launched run, and torchrun then sends each the same signal again."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


@dataclass(frozen=True)
class Owner:
    """A process that claims rows, told apart from every other process on any machine.

    Args:
        host: The machine's name.
        pid: The process id on that machine.
        process_index: The process's index in its launched run (0 for a single process).
        token: Random: tells this process from an earlier one that had the same pid.
    """

    host: str
    pid: int
    process_index: int
    token: str

    @classmethod
    def this_process(cls, process_index: int) -> "Owner":
        """The current process."""
        return cls(socket.gethostname(), os.getpid(), process_index, secrets.token_hex(8))

    def record(self) -> dict:
        """The claim file's content: who, and since when (seconds since the epoch)."""
        return {
            "host": self.host,
            "pid": self.pid,
            "process_index": self.process_index,
            "time": round(time.time(), 3),
            "token": self.token,
        }


def public(record: dict) -> dict:
    """A claim's record as the summary shows it (without the token)."""
    return {key: value for key, value in record.items() if key != "token"}


def describe(record: dict) -> str:
    """`host H pid P, claimed N s ago`, for messages about a claim."""
    age = time.time() - record["time"] if isinstance(record.get("time"), (int, float)) else None
    since = f", claimed {age:.0f} s ago" if age is not None else ""
    return f"host {record.get('host', '?')} pid {record.get('pid', '?')}{since}"


def pid_alive(pid: object) -> bool:
    """Whether a process of this id runs on this machine (True when that cannot be told)."""
    if not isinstance(pid, int) or pid <= 0 or os.name == "nt":  # on Windows os.kill would end the process
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def stale_reason(record: dict, path: Path, me: Owner, timeout: float) -> str | None:
    """Why a claim no longer holds (its owner is gone, or it is too old), or None while its owner may work on."""
    claimed_at = record.get("time")
    if not isinstance(claimed_at, (int, float)):  # unreadable: judged by the file's age
        with contextlib.suppress(OSError):
            claimed_at = path.stat().st_mtime
    if not isinstance(claimed_at, (int, float)) or time.time() - claimed_at > timeout:
        return f"older than {timeout:g} s"
    # A process id says something only on its own machine; this process's own id with another token is a former
    # process (an earlier run in this interpreter, or an id reused after a restart).
    if record.get("host") == me.host:
        if record.get("pid") == me.pid and record.get("token") != me.token:
            return "its process is gone"
        if not pid_alive(record.get("pid")):
            return "its process is gone"
    return None


def read_claim(path: Path) -> dict | None:
    """A claim file's record: None when there is no claim, {} when it cannot be read (judged by its age then)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def create_exclusively(path: Path, record: dict) -> bool:
    """Create `path` holding `record`, only if it does not exist (atomic, also on shared storage); False if it does."""
    try:
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(record, file)
    except BaseException:  # a claim must not be left empty: it would be judged by its age only
        path.unlink(missing_ok=True)
        raise
    return True


def discard_stale(path: Path, judged: dict) -> None:
    """Move a stale claim out of the way. Two processes may judge the same claim stale: the second one's rename can
    catch the first one's fresh claim, which it then puts back."""
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.stale")
    try:
        os.rename(path, aside)  # atomic: of the processes that try, one gets each version of the file
    except FileNotFoundError:
        return
    moved = read_claim(aside)
    aside.unlink(missing_ok=True)
    if moved and moved != judged:
        create_exclusively(path, moved)


@dataclass
class Claim:
    """The outcome of `acquire`: held by this process (`holder` is this process's record) or by a live other.

    Args:
        acquired: Whether this process now holds the claim.
        holder: The record of the process that holds it.
        replaced: The stale claim that was taken over, with the reason, if any.
    """

    acquired: bool
    holder: dict
    replaced: dict | None = None


def acquire(path: Path, me: Owner, timeout: float) -> Claim:
    """Claim `path` for this process, taking over a stale claim; a live one is left to its owner."""
    replaced = None
    for _ in range(5):  # the file may be released or taken over by others between the steps: look again
        record = me.record()
        if create_exclusively(path, record):
            return Claim(True, record, replaced)
        holder = read_claim(path)
        if holder is None:
            continue
        if holder.get("token") == me.token:  # left by this process (stopped between creating and using it)
            return Claim(True, holder, replaced)
        reason = stale_reason(holder, path, me, timeout)
        if reason is None:
            return Claim(False, holder)
        replaced = {**public(holder), "reason": reason}
        discard_stale(path, holder)
    return Claim(False, read_claim(path) or {})


def release(path: Path, me: Owner) -> None:
    """Remove this process's claim (not one that another process has taken over meanwhile); never raises."""
    with contextlib.suppress(OSError):
        holder = read_claim(path)
        if holder and holder.get("token") == me.token:
            path.unlink()


@contextlib.contextmanager
def locked(path: Path, me: Owner):
    """Hold the lock file `path` while the block runs: a claim that is waited for, taken over after `LOCK_TIMEOUT`."""
    while not acquire(path, me, LOCK_TIMEOUT).acquired:
        time.sleep(LOCK_INTERVAL)
    try:
        yield
    finally:
        release(path, me)


def read_summary(path: Path) -> list[dict]:
    """The rows of a `summary.json`; none when it is missing or unreadable (it is rebuilt from the runs' rows)."""
    try:
        rows = json.loads(path.read_text()).get("pairs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [row for row in rows if isinstance(row, dict) and isinstance(row.get("row"), int)]


def newest_settled(entry: dict) -> tuple:
    """Merge order of two entries of one row: a settled row over one that is not, then the newer one."""
    return entry.get("status") in FINAL, entry.get("time") or 0


def merge_summary(output_path: Path, pairs: list[Pair], keys: dict[int, str], entries: list[dict], me: Owner) -> dict:
    """Merge `entries` into `OUTPUT_PATH/summary.json` and return it: one entry for every row of the manifest.

    For each row the entries of the same folder and `key` (row and options) compete, those already in the file and
    the given ones: a settled entry wins over one that is not (claimed, interrupted), then the newer one; a row
    without one is `pending`. Entries of other keys (an edited row) are dropped. Runs and processes merge one at a
    time under a lock, and the file is replaced atomically, so none loses another's entries.

    Args:
        output_path: The batch's output folder.
        pairs: The manifest's rows.
        keys: Each row's `fingerprint`, by row index.
        entries: This process's entries (or those gathered from a run's processes).
        me: This process, as the lock's owner.
    """
    path = output_path / SUMMARY_FILE
    with locked(output_path / f"{SUMMARY_FILE}.lock", me):
        candidates = {}
        for entry in [*read_summary(path), *entries]:
            candidates.setdefault(entry["row"], []).append(entry)
        rows = []
        for pair in pairs:
            current = [
                entry
                for entry in candidates.get(pair.index, [])
                if entry.get("folder") == pair.name and entry.get("key") == keys[pair.index]
            ]
            pending = {"row": pair.index, "folder": pair.name, "status": "pending", "error": None}
            rows.append(max(current, key=newest_settled) if current else {**pending, "key": keys[pair.index]})
        counts = Counter(row["status"] for row in rows)
        summary = {**{status: counts[status] for status in STATUSES}, "pairs": rows}
        write_atomically(path, lambda partial: Path(partial).write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


def marker_matches(marker: Path, key: str) -> bool:
    """Whether the row's `done` marker holds `key` (its outputs are complete and current)."""
    record = read_marker(marker)
    return record is not None and record.get("key") == key


@dataclass
class RowRunner:
    """One process's part of a batch: its rows, run under claims, and their summary entries.

    Args:
        pipe: The loaded pipeline.
        options: The batch's options.
        pairs: All the manifest's rows (for the summary).
        device: This process's device.
        me: This process, as the owner of its claims.
        changed: What `retire_stale` found changed for rows since their folders were finished, by row index.
        entries: This process's summary entry of each row it has looked at, by row index.
        current: The row being run, for the report of an interrupted run.
        summary_failed: `summary.json` could not be written (reported once).

    Its `keys` are each row's `fingerprint`, by row index.
    """

    pipe: CrossImageAttentionPipeline
    options: argparse.Namespace
    pairs: list[Pair]
    device: torch.device
    me: Owner
    changed: dict[int, dict] = field(default_factory=dict)
    entries: dict[int, dict] = field(default_factory=dict)
    current: Pair | None = None
    summary_failed: bool = False

    def __post_init__(self):
        self.keys = {pair.index: pair.key for pair in self.pairs}

    def record(self, pair: Pair, status: str, **fields) -> str:
        """Keep the row's entry and merge it into the summary at once (a killed process loses no finished row)."""
        self.entries[pair.index] = {
            "row": pair.index,
            "folder": pair.name,
            "status": status,
            "error": None,
            "process_index": self.me.process_index,
            "host": self.me.host,
            "pid": self.me.pid,
            "time": round(time.time(), 3),
            **fields,
            "key": self.keys[pair.index],
        }
        if pair.index in self.changed:
            self.entries[pair.index]["changed"] = self.changed[pair.index]
        self.current = None
        self.save()
        return status

    def save(self) -> dict | None:
        """Merge this process's entries into `summary.json`; a failure is reported once and never stops the rows."""
        try:
            return merge_summary(self.options.output_path, self.pairs, self.keys, [*self.entries.values()], self.me)
        except Exception as error:  # e.g. a read-only or full output folder: the rows' own files still tell
            if not self.summary_failed:
                path = self.options.output_path / SUMMARY_FILE
                tqdm.write(f"error: cannot write {path}: {one_line(error)}", sys.stderr)
            self.summary_failed = True
            return None

    def run(self, share: list[Pair], show_progress: bool) -> None:
        """Settle each row of `share`, then wait for those that other runs hold until they are settled."""
        waiting = []
        with tqdm(total=len(share), desc="pairs", unit="pair", disable=not show_progress) as bar:
            for pair in share:
                bar.set_postfix_str(pair.name)
                if self.settle(pair) == "claimed":
                    waiting.append(pair)
                else:
                    bar.update()
            while waiting:
                time.sleep(WAIT_INTERVAL)
                for pair in list(waiting):
                    # The other run's own entry (merged before its claim is released) then stands for the row.
                    if self.settled_elsewhere(pair) or self.settle(pair, waited=True) != "claimed":
                        waiting.remove(pair)
                        bar.update()

    def settled_elsewhere(self, pair: Pair) -> bool:
        """Whether another run finished the row, or failed it since this process found it claimed."""
        if marker_matches(self.options.output_path / pair.name / DONE_MARKER, self.keys[pair.index]):
            return True
        seen = self.entries[pair.index]["time"]
        return any(
            entry["row"] == pair.index
            and entry.get("key") == self.keys[pair.index]
            and entry.get("status") == "failed"
            and (entry.get("time") or 0) > seen
            for entry in read_summary(self.options.output_path / SUMMARY_FILE)
        )

    def settle(self, pair: Pair, waited: bool = False) -> str:
        """Skip, run or fail one row, or find it claimed by another run; returns its status. Only a signal raises.

        Args:
            pair: The row.
            waited: The row was found claimed before (reported then).
        """
        self.current = pair
        folder = self.options.output_path / pair.name
        marker, claim_path = folder / DONE_MARKER, folder / CLAIM_FILE
        key = self.keys[pair.index]
        try:
            if marker_matches(marker, key):
                return self.record(pair, "skipped")
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"the row's output folder is not a folder: {folder}")
            folder.mkdir(parents=True, exist_ok=True)
            claim = acquire(claim_path, self.me, self.options.claim_timeout)
        except Exception as error:  # nothing was claimed: report the row and go on
            return self.fail(pair, folder, error)
        if not claim.acquired:
            if waited:  # reported and recorded when first found
                self.current = None
                return "claimed"
            tqdm.write(f"{pair.name}: claimed by another run ({describe(claim.holder)}); waiting for it", sys.stderr)
            return self.record(pair, "claimed", claimed_by=public(claim.holder))
        took_over = {}
        if claim.replaced is not None:
            reason = claim.replaced["reason"]
            tqdm.write(f"{pair.name}: taking over the claim of {describe(claim.replaced)} ({reason})", sys.stderr)
            took_over = {"took_over": claim.replaced}
        start = time.perf_counter()
        try:
            if marker_matches(marker, key):  # finished by another run between the first look and the claim
                return self.record(pair, "skipped")
            pair_args = pair_options(self.options, pair, self.device)
            check_settings(pair_args, pair_args.domain_name)
            # A changed row runs again: its old marker and error must not outlive the new attempt.
            marker.unlink(missing_ok=True)
            (folder / ERROR_FILE).unlink(missing_ok=True)
            extra = {"process_index": self.me.process_index, "numerics": numerics(self.device, self.options.dtype)}
            run_pair(self.pipe, pair_args, extra)
            # The cells and image hashes let a later run tell which row's inputs changed once the key no longer does.
            record = {"key": key, "cells": pair.cells, "images": pair.images}
            write_atomically(marker, lambda path: Path(path).write_text(json.dumps(record) + "\n"))
            seconds = round(time.perf_counter() - start, 3)
            return self.record(pair, "done", seconds=seconds, **took_over)
        except Exception as error:  # any failure, a model's included, fails this row only
            return self.fail(pair, folder, error, **took_over)
        finally:
            release(claim_path, self.me)  # also when a signal stops the row: a re-run takes it at once

    def fail(self, pair: Pair, folder: Path, error: Exception, **fields) -> str:
        """Report a failed row on stderr and in the summary, with `error.txt` in its folder where that can be
        written; never raises (the folder may be a file, read-only or full)."""
        message, details = one_line(error), traceback.format_exc()
        try:
            write_atomically(folder / ERROR_FILE, lambda path: Path(path).write_text(f"{message}\n\n{details}"))
        except Exception as write_error:
            message += f" (error.txt not written: {one_line(write_error)})"
        with contextlib.suppress(Exception):
            tqdm.write(f"error: {pair.name}: {message}", file=sys.stderr)  # above the progress bar
        return self.record(pair, "failed", error=message, **fields)

    def stop(self, cause: str) -> None:
        """Write the summary of what finished when the process is stopped, with one line on stderr.

        Args:
            cause: What stopped it, for the line: `SIGINT`, or what went wrong.
        """
        if self.current is not None:
            self.record(self.current, "interrupted")
        counts = Counter(entry["status"] for entry in self.entries.values())
        line = f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
        if counts["claimed"]:
            line += f", {counts['claimed']} left to other runs"
        interrupted = [entry["folder"] for entry in self.entries.values() if entry["status"] == "interrupted"]
        if interrupted:
            line += f"; {', '.join(interrupted)} not finished"
        where = "not written" if self.summary_failed else f"in {self.options.output_path / SUMMARY_FILE}"
        print(f"stopped by {cause}: process {self.me.process_index}: {line}; summary {where}", file=sys.stderr)


def finish(runner: RowRunner, results: list[dict], is_main_process: bool) -> int:
    """On the main process, merge the run's rows into the summary and print what this run did, the rows that other
    runs did, the failed rows and where the summary is. Returns the exit status: 1 if a row failed, else 0."""
    failed = any(result["status"] == "failed" for result in results)
    if not is_main_process:
        return int(failed)
    path = runner.options.output_path / SUMMARY_FILE
    try:  # every process has merged its rows already; this adds nothing but makes sure
        summary = merge_summary(runner.options.output_path, runner.pairs, runner.keys, results, runner.me)
    except Exception as error:
        print_error(OSError(f"cannot write {path}: {one_line(error)}"))
        return 1
    counts = Counter(result["status"] for result in results)
    line = f"{len(results)} pairs: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed"
    print(line + (f", {counts['claimed']} by other runs" if counts["claimed"] else ""))
    for row in summary["pairs"]:
        if row["status"] == "failed":
            print(f"  failed {row['folder']}: {row['error']}")
    print(f"Summary in {path}")
    return int(failed or summary["failed"] > 0)


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
    """Run the batch; returns 0, 1 if the setup or any row failed, or 128 + the signal that stopped it."""
    try:
        options = parse_args(argv)
    except UsageError as error:
        print_error(error)
        return 1
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
        key_rows(options, pairs)
    except (ValueError, OSError) as error:
        if state.is_main_process:
            print_error(error)
        return 1
    me = Owner.this_process(state.process_index)
    runner = None
    with stop_signals_raise():
        try:
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
            # One process retires the stale folders (before any row runs, so none is moved while it is written) and
            # tells the others which rows changed.
            changed = retire_stale(options.output_path, pairs) if state.is_main_process else {}
            changed = broadcast_object_list([changed])[0]
            runner = RowRunner(pipe, options, pairs, device, me, changed)
            with state.split_between_processes(pairs) as share:
                # The single-pair helpers print progress lines; through tqdm they do not break the bar.
                with contextlib.redirect_stdout(DummyTqdmFile(sys.stdout)):
                    runner.run(share, show_progress=state.is_local_main_process)
            try:
                results = gather_object(list(runner.entries.values()))
            except RuntimeError as error:  # another process of the run died: torchrun is about to stop this one
                ignore_stop_signals()
                runner.stop(f"the loss of another process ({one_line(error)[:200]})")
                return 1
            return finish(runner, sorted(results, key=lambda result: result["row"]), state.is_main_process)
        except (KeyboardInterrupt, Stopped) as stop:  # KeyboardInterrupt: a SIGINT handler of the caller's
            ignore_stop_signals()
            signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
            if runner is None:
                print(f"stopped by {signal.Signals(signum).name} before any row ran", file=sys.stderr)
            else:
                runner.stop(signal.Signals(signum).name)
            return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
