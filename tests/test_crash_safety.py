"""kill -9 at random moments, while measuring and while writing: nothing is lost and nothing is left half-done.

`bpwopt --allow-requantize --sample-rows 64 --state-file S --target-bpw 5.5
DEMO OUT` runs again and again on the demo model and is killed each time,
first at random points of its measurement (a random time after a random
number of new measurements have landed in the state), then at random points
of its write (when `OUT.tmp` has reached a random fraction of the file).
After every kill the state passes SQLite's integrity check and OUT holds
nothing or a complete GGUF with the plan's types; `OUT.tmp` may remain. A
last run then completes with the same plan as an uninterrupted run, and
leaves no temporary file behind.

The kill schedule is seeded. `BPWOPT_KILLS` sets the number of kills (8 by
default, 50 for the run in benchmarks/RESULTS.md), `BPWOPT_KILL_SECONDS` the
time the kills may take.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from bpwopt.cli.main import main
from bpwopt.errors import BpwoptError
from bpwopt.formats.gguf_reader import LazyGGUFReader
from bpwopt.formats.gguf_writer import TensorSlot, write_gguf
from bpwopt.formats.output_paths import temporary_path

pytestmark = pytest.mark.slow  # kill tests on the demo model

KILLS = int(os.environ.get("BPWOPT_KILLS", "8"))
KILL_SECONDS = float(os.environ.get("BPWOPT_KILL_SECONDS", str(15 * KILLS)))
SEED = 20240607
RUN = ["--allow-requantize", "--sample-rows", "64", "--quiet", "--target-bpw", "5.5"]
REPO = Path(__file__).resolve().parents[1]


def run_json(*arguments) -> dict:
    """An in-process run with --json; its summary."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*RUN, "--json", *map(str, arguments)]) == 0
    return json.loads(stdout.getvalue())


def plan_types(summary: dict) -> dict[str, str]:
    return {tensor["name"]: tensor["qtype"] for tensor in summary["tensors"]}


def stored_measurements(state: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=1)) as db:
            return db.execute("SELECT count(*) FROM measurements").fetchone()[0]
    except sqlite3.Error:  # not created yet, or caught between its temporary file and its link
        return 0


def file_types(path: Path) -> dict[str, str]:
    """Tensor name -> type of a GGUF, read with the same layout checks bpwopt applies to its inputs."""
    return {tensor.name: tensor.tensor_type.name for tensor in LazyGGUFReader(path).tensors}


@dataclass
class Kill:
    phase: str  # where the process was: "measurement", "solve" (all measured, no OUT.tmp yet) or "writing"
    measurements: int  # in the state after the kill
    temporary_bytes: int  # size of the OUT.tmp this run wrote, after the kill (0: it wrote none)


def kill_when(child: subprocess.Popen, ready: Callable[[], bool], signum: int = signal.SIGKILL) -> bool:
    """Send the child signum (SIGKILL unless told) as soon as ready() holds; False when it finished first."""
    while child.poll() is None:
        if ready():
            os.kill(child.pid, signum)
            child.wait()
            return True
        time.sleep(0.02)
    return False


def after_measurement(state: Path, count: int, extra_seconds: float) -> Callable[[], bool]:
    """A moment `extra_seconds` after the state holds `count` measurements."""
    reached: list[float] = []

    def ready() -> bool:
        if not reached and stored_measurements(state) >= count:
            reached.append(time.monotonic())
        return bool(reached) and time.monotonic() >= reached[0] + extra_seconds

    return ready


def modified_since(path: Path, stale: int | None) -> os.stat_result | None:
    """path's status if it exists and its modification time is not `stale` (that of a killed run's leftover)."""
    with contextlib.suppress(FileNotFoundError):
        status = path.stat()
        return status if status.st_mtime_ns != stale else None
    return None


def while_writing(out: Path, nbytes: float) -> Callable[[], bool]:
    """The moment this run's OUT.tmp holds `nbytes` bytes (a leftover of a killed run does not count)."""
    leftover = modified_since(temporary_path(out), None)
    stale = leftover.st_mtime_ns if leftover else None

    def ready() -> bool:
        status = modified_since(temporary_path(out), stale)
        return status is not None and status.st_size >= nbytes

    return ready


@pytest.fixture(scope="module")
def uninterrupted(demo_model_path, tmp_path_factory) -> dict:
    """The plan of a run that nobody kills (a dry run: writing does not change the plan)."""
    state = tmp_path_factory.mktemp("uninterrupted") / "state.bpw_state"
    return run_json("--dry-run", "--state-file", state, demo_model_path)


def test_kill_9_while_measuring_and_writing_loses_nothing(demo_model_path, uninterrupted, tmp_path):
    expected = plan_types(uninterrupted)
    total_measurements = uninterrupted["measured"]
    state, out = tmp_path / "S.bpw_state", tmp_path / "out.gguf"
    command = [sys.executable, "-m", "bpwopt.cli", *RUN, "--state-file", str(state), str(demo_model_path), str(out)]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = np.random.default_rng(SEED)
    # 60 % of the kills at random points spread over the whole measurement, the rest while writing; past the
    # time limit no new measuring kill starts, and one writing kill is always made
    measuring_points = sorted(rng.uniform(0.0, 1.0, round(0.6 * KILLS)) * total_measurements)
    deadline = time.monotonic() + KILL_SECONDS
    kills: list[Kill] = []
    attempts = 0
    while len(kills) < KILLS:
        before, in_time = stored_measurements(state), time.monotonic() < deadline
        if attempts < len(measuring_points) and before < total_measurements and in_time:
            # once this run has stored its first measurement and reached the point, then up to 0.3 s more
            point = min(max(measuring_points[attempts], before + 1), total_measurements)
            ready = after_measurement(state, point, rng.uniform(0.0, 0.3))
        elif in_time or not any(kill.phase == "writing" for kill in kills):
            ready = while_writing(out, rng.uniform(0.0, 1.0) * uninterrupted["file_bytes"])
        else:
            break
        attempts += 1
        leftover = modified_since(temporary_path(out), None)
        child = subprocess.Popen(command, env=environment, stderr=subprocess.DEVNULL)
        if not kill_when(child, ready):
            assert child.returncode == 0, "a run that was not killed failed"
            continue
        written = modified_since(temporary_path(out), leftover.st_mtime_ns if leftover else None)
        measured = stored_measurements(state)
        phase = "writing" if written else "measurement" if measured < total_measurements else "solve"
        kills.append(Kill(phase, measured, written.st_size if written else 0))
        if state.exists():
            with contextlib.closing(sqlite3.connect(state)) as db:
                assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        if out.exists():  # from a run that completed earlier: a killed rerun must not have touched it
            assert file_types(out) == expected

    phases = {phase: sum(kill.phase == phase for kill in kills) for phase in ("measurement", "solve", "writing")}
    print(f"\n{len(kills)} kills: {phases}; {[(k.phase, k.measurements, k.temporary_bytes) for k in kills]}")
    assert phases["measurement"] >= 1 and phases["writing"] >= 1
    assert any(kill.temporary_bytes for kill in kills)  # so the last run has a stale OUT.tmp to take over

    resumed = run_json("--state-file", state, demo_model_path, out)
    assert plan_types(resumed) == expected
    assert resumed["predicted_error"] == pytest.approx(uninterrupted["predicted_error"], rel=1e-12)
    assert file_types(out) == expected and out.stat().st_size == uninterrupted["file_bytes"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["S.bpw_state", "out.gguf"]


def test_sigint_and_sigterm_stop_cleanly_while_measuring_and_writing(demo_model_path, uninterrupted, tmp_path):
    """Ctrl-C and SIGTERM at random moments: one line, 130 / 143, no temporary, the output and measurements kept."""
    expected, total_measurements = plan_types(uninterrupted), uninterrupted["measured"]
    state, out = tmp_path / "S.bpw_state", tmp_path / "out.gguf"
    out.write_bytes(b"the user's previous output")
    command = [sys.executable, "-m", "bpwopt.cli", *RUN, "--state-file", str(state), str(demo_model_path), str(out)]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = np.random.default_rng(SEED + 1)
    lines = {signal.SIGINT: "bpwopt: interrupted by SIGINT", signal.SIGTERM: "bpwopt: terminated by SIGTERM"}
    schedule = [("measuring", signal.SIGINT), ("measuring", signal.SIGTERM)]
    schedule += [("writing", signal.SIGINT), ("writing", signal.SIGTERM)]
    for phase, signum in schedule:
        before = stored_measurements(state)
        if phase == "measuring":  # after one to a third of the measurements this run makes, then up to 0.3 s more
            point = min(before + 1 + int(rng.integers(0, total_measurements // 3)), total_measurements)
            ready = after_measurement(state, point, rng.uniform(0.0, 0.3))
        else:  # within the first half of the write: a signal sent as the last bytes go out can land after the
            # run has finished (seen once on a loaded machine), and then there is nothing left to stop
            ready = while_writing(out, rng.uniform(0.0, 0.5) * uninterrupted["file_bytes"])
        child = subprocess.Popen(  # SIGINT as a terminal sends it, even where the test runner ignores it
            command, env=environment, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        assert kill_when(child, ready, signum), "the run finished before the signal"
        assert (child.returncode, child.stderr.read().splitlines()) == (128 + signum, [lines[signum]])
        assert out.read_bytes() == b"the user's previous output"
        assert sorted(path.name for path in tmp_path.iterdir()) == ["S.bpw_state", "out.gguf"]  # no .tmp, no -wal
        with contextlib.closing(sqlite3.connect(state)) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert stored_measurements(state) >= max(before, 1)

    kept = stored_measurements(state)
    resumed = run_json("--state-file", state, demo_model_path, out)
    assert plan_types(resumed) == expected and (resumed["measured"], resumed["reused"]) == (0, kept)
    assert file_types(out) == expected and out.stat().st_size == uninterrupted["file_bytes"]


def test_a_second_writer_of_the_same_output_is_refused_and_the_first_finishes(tmp_path):
    out = tmp_path / "model.gguf"
    slot = TensorSlot("t", (64,), gguf.GGMLQuantizationType.F32, 256)
    with temporary_path(out).open("wb") as first:  # a live writer holds OUT.tmp locked
        fcntl.flock(first, fcntl.LOCK_EX)
        first.write(b"first writer's bytes")
        first.flush()
        with pytest.raises(BpwoptError, match="is being written by another bpwopt process"):
            write_gguf(out, [], [slot], lambda index: [np.zeros(256, np.uint8)])
        assert temporary_path(out).read_bytes() == b"first writer's bytes" and not out.exists()
    # its lock gone with it (as with a killed run), the temporary is taken over and renamed into place
    assert write_gguf(out, [], [slot], lambda index: [np.zeros(256, np.uint8)]) == out.stat().st_size
    assert [path.name for path in tmp_path.iterdir()] == ["model.gguf"]


def test_a_symlink_in_place_of_the_temporary_is_not_followed(tmp_path):
    out, victim = tmp_path / "model.gguf", tmp_path / "victim.txt"
    victim.write_text("someone else's file")
    temporary_path(out).symlink_to(victim)
    slot = TensorSlot("t", (64,), gguf.GGMLQuantizationType.F32, 256)
    with pytest.raises(BpwoptError, match="cannot write"):
        write_gguf(out, [], [slot], lambda index: [np.zeros(256, np.uint8)])
    assert victim.read_text() == "someone else's file" and not out.exists()
