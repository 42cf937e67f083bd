"""Resource faults: a read-only directory, a full disk, an input deleted or cut while it is read.

Each fault is made real in a child process running `bpwopt` (its `main`), so
that the parent can set it up and look at the files afterwards: the child
drops CAP_DAC_OVERRIDE (root writes anywhere otherwise) or lowers
RLIMIT_FSIZE (writes past the limit fail with EFBIG, as a full disk fails
them with ENOSPC), or pauses before a tensor is read so that the parent can
delete or truncate the input. The user's files must come through untouched:
a previous output, and the state with every measurement committed before
the fault, which a rerun then reuses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bpwopt.cli.main import main
from tests.conftest import write_one_block_model as write_model

pytestmark = pytest.mark.slow  # full disks and truncated inputs while measuring the demo model

REPO = Path(__file__).resolve().parents[1]
PREVIOUS = b"the user's previous output"
OPTIMIZE = ["--quiet", "--target-bpw", "6"]

# The child: sets up the fault named by argv[1], then runs `bpwopt ARGV[2:]` and exits with its status.
CHILD = textwrap.dedent("""
    import ctypes, os, resource, signal, sys
    from bpwopt.cli.main import main
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault == "read-only":  # root writes anywhere: drop CAP_DAC_OVERRIDE so that it obeys modes as a user does
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        caps = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) x two 32-bit words
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.capget(header, caps) == 0
        caps[0] &= ~(1 << 1)  # CAP_DAC_OVERRIDE
        assert libc.capset(header, caps) == 0, ctypes.get_errno()
    elif fault.startswith("file-size="):  # a disk that is full beyond this many bytes per file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(fault.removeprefix("file-size="))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    elif fault.startswith("pause-before="):  # wait for the parent before reading this tensor
        import bpwopt.measure.measure, bpwopt.write.model_writer
        name = fault.removeprefix("pause-before=")
        def pausing(original):
            def wrapper(tensor, *args):
                if tensor.name == name:
                    print("paused", flush=True)
                    sys.stdin.readline()
                return original(tensor, *args)
            return wrapper
        bpwopt.write.model_writer._converted_pieces = pausing(bpwopt.write.model_writer._converted_pieces)
        bpwopt.measure.measure.load_rows = pausing(bpwopt.measure.measure.load_rows)
    elif fault == "pause-in-read":  # wait for the parent in the middle of reading a 512-row tensor
        import bpwopt.measure.measure, bpwopt.write.model_writer
        original = bpwopt.write.model_writer.rows_to_float
        def pausing(raw_rows, source_type, name):
            if raw_rows.shape[0] >= 512:
                print("paused", flush=True)
                sys.stdin.readline()
            return original(raw_rows, source_type, name)
        bpwopt.write.model_writer.rows_to_float = bpwopt.measure.measure.rows_to_float = pausing
    sys.exit(main(argv))
""")


def child(fault: str, *argv, **popen) -> subprocess.Popen:
    command = [sys.executable, "-c", CHILD, fault, *map(str, argv)]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def run_child(fault: str, *argv) -> tuple[int, str]:
    process = child(fault, *argv)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpwopt: error: "), stderr
    return lines[0]


def run_json(*argv) -> dict:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*map(str, argv), "--json"]) == 0
    return json.loads(stdout.getvalue())


def stored_measurements(state: Path) -> int:
    with contextlib.closing(sqlite3.connect(state)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return db.execute("SELECT count(*) FROM measurements").fetchone()[0]


@pytest.fixture
def read_only(tmp_path):
    """A directory holding a previous output, made read-only for the test."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    (directory / "out.gguf").write_bytes(PREVIOUS)
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)


def test_read_only_output_directory_keeps_the_previous_output(tmp_path, read_only):
    model = write_model(tmp_path / "model.gguf")
    status, stderr = run_child("read-only", "--quiet", model, read_only / "out.gguf", "Q8_0")
    assert status == 1
    assert one_error_line(stderr) == (
        f"bpwopt: error: cannot write {read_only}/out.gguf: Permission denied (its temporary goes in {read_only})"
    )
    assert sorted(os.listdir(read_only)) == ["out.gguf"] and (read_only / "out.gguf").read_bytes() == PREVIOUS


def test_read_only_output_directory_is_refused_before_measuring(tmp_path, read_only):
    model, state = write_model(tmp_path / "model.gguf"), tmp_path / "run.bpw_state"
    status, stderr = run_child("read-only", *OPTIMIZE, "--state-file", state, model, read_only / "out.gguf")
    assert status == 1 and "Permission denied" in one_error_line(stderr)
    assert (read_only / "out.gguf").read_bytes() == PREVIOUS and sorted(os.listdir(read_only)) == ["out.gguf"]
    assert not state.exists()  # nothing measured, nothing created


def test_an_output_the_user_cannot_write_is_refused_before_measuring(tmp_path):
    model, state, out = write_model(tmp_path / "model.gguf"), tmp_path / "run.bpw_state", tmp_path / "out.gguf"
    out.write_bytes(PREVIOUS)
    out.chmod(0o444)
    status, stderr = run_child("read-only", *OPTIMIZE, "--state-file", state, model, out)
    assert status == 1
    assert one_error_line(stderr) == f"bpwopt: error: cannot write {out}: Permission denied"
    assert out.read_bytes() == PREVIOUS and not state.exists()


def test_read_only_state_directory_is_refused_before_measuring(tmp_path, read_only):
    model = write_model(tmp_path / "model.gguf")
    status, stderr = run_child("read-only", *OPTIMIZE, "--state-file", read_only / "run.bpw_state", model)
    assert status == 1
    assert one_error_line(stderr) == (
        f"bpwopt: error: cannot create state file {read_only}/run.bpw_state: Permission denied"
    )
    assert sorted(os.listdir(read_only)) == ["out.gguf"]


def test_a_read_only_state_is_solved_again_and_refused_only_for_a_new_measurement(tmp_path, read_only):
    model, state = write_model(tmp_path / "model.gguf"), read_only / "run.bpw_state"
    read_only.chmod(0o755)
    first = run_json(*OPTIMIZE, "--state-file", state, model, tmp_path / "first.gguf")
    read_only.chmod(0o555)
    stored = state.read_bytes()
    status, stderr = run_child("read-only", "--quiet", "--target-bpw", "5", "--state-file", state, model,
                               tmp_path / "again.gguf")  # fmt: skip
    reused = f"measured 0 (tensor, type) pairs, reused {first['measured']} from the state"
    assert status == 0 and reused in stderr  # another budget
    assert (tmp_path / "again.gguf").stat().st_size < first["file_bytes"]
    assert state.read_bytes() == stored and sorted(os.listdir(read_only)) == ["out.gguf", "run.bpw_state"]

    read_only.chmod(0o755)
    with contextlib.closing(sqlite3.connect(state)) as db, db:
        db.execute("DELETE FROM statistics WHERE qtype = 'Q8_0'")
        db.execute("DELETE FROM measurements WHERE qtype = 'Q8_0'")
    read_only.chmod(0o555)
    status, stderr = run_child("read-only", *OPTIMIZE, "--state-file", state, model, tmp_path / "third.gguf")
    assert status == 1
    assert one_error_line(stderr).startswith(f"bpwopt: error: state file {state} is read-only and lacks ")
    assert not (tmp_path / "third.gguf").exists()


def test_full_disk_while_writing_the_plan_keeps_the_previous_output_and_the_state(tmp_path):
    model, state, out = (
        write_model(tmp_path / "model.gguf", rows=8192),
        tmp_path / "run.bpw_state",
        tmp_path / "out.gguf",
    )
    out.write_bytes(PREVIOUS)
    status, stderr = run_child("file-size=1000000", *OPTIMIZE, "--state-file", state, model, out)  # output: ~3 MB
    assert status == 1
    assert one_error_line(stderr) == f"bpwopt: error: cannot write {out}: File too large"
    assert out.read_bytes() == PREVIOUS
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.gguf", "out.gguf", "run.bpw_state"]
    measured = stored_measurements(state)
    rerun = run_json(*OPTIMIZE, "--state-file", state, model, out)
    assert (rerun["measured"], rerun["reused"]) == (0, measured)
    assert out.stat().st_size == rerun["file_bytes"]


def test_full_disk_while_measuring_keeps_what_was_committed(tmp_path):
    model, state = write_model(tmp_path / "model.gguf", rows=64), tmp_path / "run.bpw_state"
    status, stderr = run_child("file-size=80000", *OPTIMIZE, "--dry-run", "--state-file", state, model)
    assert status == 1
    assert one_error_line(stderr).startswith(f"bpwopt: error: cannot write state file {state}: ")
    committed = stored_measurements(state)
    assert committed > 0
    rerun = run_json(*OPTIMIZE, "--dry-run", "--state-file", state, model)
    assert rerun["reused"] == committed and rerun["measured"] > 0


def test_full_disk_while_creating_the_state_leaves_no_state(tmp_path):
    model, state = write_model(tmp_path / "model.gguf"), tmp_path / "run.bpw_state"
    status, stderr = run_child("file-size=4096", *OPTIMIZE, "--dry-run", "--state-file", state, model)
    assert status == 1
    assert one_error_line(stderr).startswith(f"bpwopt: error: cannot create state file {state}")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.gguf"]


def paused_run(fault: str, *argv) -> subprocess.Popen:
    process = child(fault, *argv, stdin=subprocess.PIPE)
    assert process.stdout.readline() == "paused\n", process.stderr.read()
    return process


def test_input_deleted_while_writing_still_gives_the_right_file(tmp_path):
    """Linux keeps a deleted file's data while it is mapped: the run completes, byte for byte as usual."""
    model, out = write_model(tmp_path / "model.gguf", rows=512), tmp_path / "out.gguf"
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["--quiet", str(model), str(tmp_path / "undisturbed.gguf"), "Q4_K"]) == 0
    process = paused_run("pause-before=blk.0.ffn_up.weight", "--quiet", model, out, "Q4_K")
    model.unlink()
    _, stderr = process.communicate("\n", timeout=120)
    assert process.returncode == 0, stderr
    assert out.read_bytes() == (tmp_path / "undisturbed.gguf").read_bytes()


WRITING = ["--quiet", "{model}", "{out}", "Q4_K"]
MEASURING = [*OPTIMIZE, "{model}", "{out}"]


def truncated_while_paused(tmp_path, fault: str, argv: list[str]) -> tuple[int, str]:
    """Run bpwopt until it pauses as the fault says, cut the model to 4 KiB, let it go on; (status, stderr)."""
    model, out = write_model(tmp_path / "model.gguf", rows=512), tmp_path / "out.gguf"
    out.write_bytes(PREVIOUS)
    original = model.read_bytes()
    process = paused_run(fault, *(a.format(model=model, out=out) for a in argv))
    os.truncate(model, 4096)
    _, stderr = process.communicate("\n", timeout=120)
    assert out.read_bytes() == PREVIOUS
    model.write_bytes(original)
    return process.returncode, stderr


@pytest.mark.parametrize(
    ("argv", "tensor"),
    [(WRITING, "blk.0.ffn_up.weight"), (MEASURING, "blk.0.attn_q.weight")],
    ids=["writing", "measuring"],
)
def test_input_truncated_between_tensors_is_a_clear_error(tmp_path, argv, tensor):
    status, stderr = truncated_while_paused(tmp_path, f"pause-before={tensor}", argv)
    assert status == 1
    assert "the file shrank to 4,096 bytes while being read" in one_error_line(stderr)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.gguf", "out.gguf"]


@pytest.mark.parametrize("argv", [WRITING, MEASURING], ids=["writing", "measuring"])
def test_input_truncated_in_the_middle_of_a_read_never_publishes_a_partial_output(tmp_path, argv):
    """Reading a mapped page past the new end raises SIGBUS: the process dies, nothing is published."""
    status, _ = truncated_while_paused(tmp_path, "pause-in-read", argv)
    assert status == -signal.SIGBUS
    with contextlib.redirect_stderr(io.StringIO()):  # the next run takes over any OUT.tmp left behind
        assert main([a.format(model=tmp_path / "model.gguf", out=tmp_path / "out.gguf") for a in argv]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.gguf", "out.gguf"]
