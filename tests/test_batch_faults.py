"""The batch command under faults and concurrency: a row that cannot be written, a stop signal, a killed process,
stale claims, and two runs on one manifest. Runs launched on two CPU processes use the tiny saved model; runs in this
process, which test the batch's bookkeeping only, a stand-in that writes each row's files without a model."""

import builtins
import csv
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from test_batch import batch_args, folders_of, launch_command, launch_env, read_json

from cross_image_attention import batch, cli

SUMMARY_LINE = re.compile(r"(\d+) pairs: (\d+) done, (\d+) skipped, (\d+) failed(?:, (\d+) by other runs)?")


@pytest.fixture(scope="module")
def pair_images(tmp_path_factory):
    """The bundled pair, in a folder of its own."""
    folder = tmp_path_factory.mktemp("pair")
    for source in (cli.EXAMPLE_APPEARANCE, cli.EXAMPLE_STRUCTURE):
        shutil.copy(source, folder)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An inversion cache shared by this module's runs: the pair is inverted once, later rows only transfer."""
    return tmp_path_factory.mktemp("inversions")


def manifest_of(path: Path, images: Path, count: int, slow_rows: tuple = ()) -> Path:
    """`count` rows of the bundled pair, told apart by their swap guidance (so each row is a transfer only); the
    `slow_rows` take 40 steps (and invert the pair again), long enough to be caught running on any machine."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["appearance", "structure", "domain_name", "swap_guidance_scale", "num_timesteps"])
        for row in range(count):
            steps = 40 if row in slow_rows else ""
            writer.writerow([images / "raccoon.jpg", images / "chelsea.jpg", "animal", 1.5 + row / 2, steps])
    return path


def args_of(model, manifest, output, cache, *extra) -> list:
    return [*batch_args(model, manifest, output, "--cache_dir", str(cache)), *extra]


def statuses(summary: dict) -> list:
    return [pair["status"] for pair in summary["pairs"]]


class StandInPipeline:
    """What the batch needs of a pipeline when the transfer is stood in for."""

    def set_progress_bar_config(self, **kwargs):
        pass


@pytest.fixture
def without_model(monkeypatch) -> list:
    """Runs of `batch.main` in this process load no model, and each row's transfer writes its files at once. Returns
    a list of actions, each called with the row's options before its files are written."""
    actions = []

    def transfer(pipe, options, paths, images, domain_name, cache_dir, reuse, extra_config):
        for action in actions:
            action(options)
        for name in ("transfer.png", "strip.png"):
            with open(options.output_path / name, "wb") as file:
                file.write(b"stand-in")
        (options.output_path / "config.json").write_text(json.dumps(extra_config))

    monkeypatch.setattr(batch, "load_pipeline", lambda model, device, dtype: StandInPipeline())
    monkeypatch.setattr(batch, "transfer_pair", transfer)
    return actions


def emulate_read_only(monkeypatch, folder: Path) -> threading.Event:
    """Make writing, creating, renaming and removing files in `folder` fail as in a read-only folder, from when the
    returned event is set. Tests run as root, whom permission bits do not stop, so the file functions are wrapped.
    """
    read_only = threading.Event()

    def check(path) -> None:
        if read_only.is_set() and Path(os.fsdecode(path)).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            check(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)  # pathlib's
    monkeypatch.setattr(os, "open", guarded_os_open)  # tempfile's
    for name in ("unlink", "remove", "rename", "replace"):
        real = getattr(os, name)

        def guarded(*paths, _real=real, **kwargs):
            for path in paths[:2]:
                check(path)
            return _real(*paths, **kwargs)

        monkeypatch.setattr(os, name, guarded)
    return read_only


def test_a_row_folder_turning_read_only_fails_that_row_only(
    saved_sd_dir, pair_images, cache, tmp_path, monkeypatch, capsys, without_model
):
    output = tmp_path / "output"
    manifest = manifest_of(tmp_path / "pairs.csv", pair_images, 3)
    folder_of = folders_of(args_of(saved_sd_dir, manifest, output, cache)).__getitem__
    broken = output / folder_of(1)
    read_only = emulate_read_only(monkeypatch, broken)
    # Row 1's folder turns read-only once the row has started: its outputs, and then its error.txt, cannot be written.
    without_model.append(lambda options: options.output_path == broken and read_only.set())
    code = batch.main(args_of(saved_sd_dir, manifest, output, cache, "--device", "cpu"))
    read_only.clear()

    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    summary = read_json(output / "summary.json")
    assert statuses(summary) == ["done", "failed", "done"]
    error = summary["pairs"][1]["error"]
    assert "Permission denied" in error and "error.txt not written" in error
    assert f"error: {folder_of(1)}: {error}" in err.splitlines()
    assert not (broken / "error.txt").exists() and not (broken / "done").exists()


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_stopped_run_writes_the_summary_of_what_finished(
    saved_sd_dir, pair_images, cache, tmp_path, capsys, without_model, name
):
    output = tmp_path / "output"
    stop = getattr(signal, name)
    manifest = manifest_of(tmp_path / "pairs.csv", pair_images, 3)
    folder_of = folders_of(args_of(saved_sd_dir, manifest, output, cache)).__getitem__
    # Ctrl-C (or torchrun's SIGTERM) while row 1 runs.
    stopped = output / folder_of(1)
    without_model.append(lambda options: options.output_path == stopped and signal.raise_signal(stop))

    class Escaped(Exception):
        pass

    def escaped(signum, frame):
        raise Escaped(signum)

    # A signal that the batch does not handle must fail this test, not stop pytest.
    handlers = {signum: signal.signal(signum, escaped) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = batch.main(args_of(saved_sd_dir, manifest, output, cache, "--device", "cpu"))
    except (Escaped, KeyboardInterrupt) as error:
        pytest.fail(f"{name} escaped from the batch: {error!r}")
    finally:
        assert all(signal.getsignal(signum) is escaped for signum in handlers)  # restored by the batch
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    assert code == 128 + stop
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    summary_path = output / "summary.json"
    assert [line for line in err.splitlines() if line.startswith("stopped")] == [
        f"stopped by {name}: process 0: 1 done, 0 skipped, 0 failed; {folder_of(1)} not finished; "
        f"summary in {summary_path}"
    ]
    summary = read_json(summary_path)
    assert statuses(summary) == ["done", "interrupted", "pending"]
    assert (summary["done"], summary["interrupted"], summary["pending"]) == (1, 1, 1)
    # The stopped row is released for the next run, and does not look done.
    assert list(output.glob("*/claim.json")) == [] and not (output / folder_of(1) / "done").exists()


def test_stale_claims_are_taken_over_and_live_ones_waited_for(
    saved_sd_dir, pair_images, cache, tmp_path, monkeypatch, capsys, without_model
):
    output = tmp_path / "output"
    manifest = manifest_of(tmp_path / "pairs.csv", pair_images, 3)
    folder_of = folders_of(args_of(saved_sd_dir, manifest, output, cache)).__getitem__
    host = socket.gethostname()
    finished = subprocess.Popen(["true"])
    finished.wait()
    sleeper = subprocess.Popen(["sleep", "120"])
    stale = {
        1: {"host": host, "pid": finished.pid, "time": time.time()},  # its process is gone
        2: {"host": "elsewhere.example", "pid": 4242, "time": time.time() - 7200},  # too old
    }
    for row, record in stale.items():
        (output / folder_of(row)).mkdir(parents=True)
        (output / folder_of(row) / "claim.json").write_text(json.dumps(record))
    load = batch.load_pipeline

    def load_then_claim_row_0(*args):
        # Another run's live process claims row 0 just before this run looks at it; its claim ages past the limit.
        pipe = load(*args)
        (output / folder_of(0)).mkdir(parents=True)
        record = {"host": host, "pid": sleeper.pid, "time": time.time()}
        (output / folder_of(0) / "claim.json").write_text(json.dumps(record))
        return pipe

    monkeypatch.setattr(batch, "load_pipeline", load_then_claim_row_0)
    try:
        code = batch.main(args_of(saved_sd_dir, manifest, output, cache, "--device", "cpu", "--claim_timeout", "2"))
        assert sleeper.poll() is None  # still alive: its claim was taken over for its age
    finally:
        sleeper.kill()
        sleeper.wait()

    assert code == 0
    err = capsys.readouterr().err
    claimed = f"{folder_of(0)}: claimed by another run (host {host} pid {sleeper.pid}, claimed "
    assert any(line.startswith(claimed) and line.endswith("; waiting for it") for line in err.splitlines()), err
    summary = read_json(output / "summary.json")
    assert statuses(summary) == ["done", "done", "done"]
    reasons = [pair["took_over"]["reason"] for pair in summary["pairs"]]
    assert reasons == ["older than 2 s", "its process is gone", "older than 2 s"]
    for row in range(3):
        assert f"{folder_of(row)}: taking over the claim of host " in err
    assert list(output.glob("*/claim.json")) == []


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240):
    """Poll `condition()` until it returns a true value while `process` runs; fail with its output otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended before {what}: {out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


def claim_of(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_two_runs_on_one_manifest_compute_each_row_once(
    saved_sd_dir, pair_images, cache, tmp_path, capsys, without_model
):
    output = tmp_path / "output"
    rows = 8
    manifest = manifest_of(tmp_path / "pairs.csv", pair_images, rows)
    folder_of = folders_of(args_of(saved_sd_dir, manifest, output, cache)).__getitem__
    # Run A on two processes; run B in this process (with the stand-in), started once A computes.
    launched = subprocess.Popen(
        [*launch_command(), *args_of(saved_sd_dir, manifest, output, cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=launch_env(tmp_path),
    )
    wait_for(lambda: any(path.is_dir() for path in output.glob("raccoon__*")), launched, "run A starts a row")
    code = batch.main(args_of(saved_sd_dir, manifest, output, cache, "--device", "cpu"))
    out_a, err_a = launched.communicate(timeout=300)
    out_b = capsys.readouterr().out

    assert launched.returncode == 0 and code == 0, err_a[-3000:]
    counts = []
    for out in (out_a, out_b):
        match = SUMMARY_LINE.search(out)
        assert match, out[-2000:]
        total, done, skipped, failed, elsewhere = (int(group or 0) for group in match.groups())
        assert total == done + skipped + elsewhere == rows and failed == 0  # each run accounts for every row
        counts.append(done)
    assert sum(counts) == rows  # each row computed once, by one run or the other
    summary = read_json(output / "summary.json")
    assert set(statuses(summary)) <= {"done", "skipped"} and summary["done"] + summary["skipped"] == rows
    assert list(output.glob("*/claim.json")) == [] and not (output / "summary.json.lock").exists()
    assert all((output / folder_of(row) / "done").is_file() for row in range(rows))


def test_a_killed_process_leaves_its_rows_in_the_summary_and_a_claim_to_take_over(
    saved_sd_dir, pair_images, cache, tmp_path, capsys, without_model
):
    output = tmp_path / "output"
    # Rows 0-1 on process 0, rows 2-3 on process 1.
    manifest = manifest_of(tmp_path / "pairs.csv", pair_images, 4, slow_rows=(3,))
    folder_of = folders_of(args_of(saved_sd_dir, manifest, output, cache)).__getitem__
    launched = subprocess.Popen(
        [*launch_command(), *args_of(saved_sd_dir, manifest, output, cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=launch_env(tmp_path),
        start_new_session=True,
    )
    # Kill process 1 once it has finished row 2 and runs row 3 (whose claim follows its folder at once).
    row_2_done, row_3 = output / folder_of(2) / "done", output / folder_of(3)
    wait_for(lambda: row_2_done.is_file() and row_3.is_dir(), launched, "process 1 runs row 3")
    deadline = time.monotonic() + 2
    while not (row_3 / "claim.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = psutil.Process(launched.pid).children(recursive=True)
    (worker,) = [worker for worker in workers if worker.environ().get("RANK") == "1"]
    worker.kill()
    out, err = launched.communicate(timeout=120)

    # torchrun stops process 0 with SIGTERM (or it finds process 1 gone): one line, and the summary of both.
    assert launched.returncode != 0
    stopped = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and "process 0:" in stopped[0] and "summary in" in stopped[0], err[-3000:]
    assert "batch.py" not in err and "KeyboardInterrupt" not in err
    summary = read_json(output / "summary.json")
    assert summary["pairs"][2]["status"] == "done" and summary["pairs"][2]["process_index"] == 1
    assert summary["pairs"][3]["status"] == "pending"
    claim = claim_of(output / folder_of(3) / "claim.json")
    assert claim["pid"] == worker.pid and claim["process_index"] == 1
    for pair in summary["pairs"]:  # no finished row is left out
        assert (pair["status"] == "done") == (output / pair["folder"] / "done").is_file()

    # A re-run takes the dead process's claim over at once and finishes the rest.
    capsys.readouterr()
    assert batch.main(args_of(saved_sd_dir, manifest, output, cache, "--device", "cpu")) == 0
    summary = read_json(output / "summary.json")
    assert set(statuses(summary)) <= {"done", "skipped"}
    public = {key: value for key, value in claim.items() if key != "token"}
    assert summary["pairs"][3]["took_over"] == {**public, "reason": "its process is gone"}
    assert list(output.glob("*/claim.json")) == []
