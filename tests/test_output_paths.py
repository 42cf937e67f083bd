"""Output paths as llama-quantize treats them: devices and FIFOs written through, links followed, the rest refused.

Each case makes the real thing in a temporary directory (a device node by
mknod, a FIFO, a symbolic or hard link, a small tmpfs in a user namespace for
a full disk) and runs `bpwopt` on a one-block model; the user's files must
come through as they were, and what is written must equal a plain write.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bpwopt.cli.main import main
from bpwopt.state.store import StateFile, read_identity
from tests.conftest import write_one_block_model

REPO = Path(__file__).resolve().parents[1]
PREVIOUS = b"the user's previous output"
NULL, FULL = os.makedev(1, 3), os.makedev(1, 7)  # the numbers of /dev/null and /dev/full
DROP_IN = ["--quiet", "{model}", "{out}", "Q8_0"]
OPTIMIZE = ["--quiet", "--target-bpw", "6", "{model}", "{out}"]


@pytest.fixture
def model(tmp_path) -> Path:
    return write_one_block_model(tmp_path / "model.gguf")


def bpwopt(argv: list[str], model: Path, out: Path, *extra: str) -> int:
    return main([*extra, *(a.format(model=model, out=out) for a in argv)])


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpwopt: error: "), lines
    return lines[0].removeprefix("bpwopt: error: ")


def plain_bytes(argv: list[str], model: Path, directory: Path) -> bytes:
    """What the command writes to an ordinary new file."""
    directory.mkdir()
    assert bpwopt(argv, model, directory / "plain.gguf") == 0
    return (directory / "plain.gguf").read_bytes()


def device(path: Path, number: int) -> Path:
    os.mknod(path, stat.S_IFCHR | 0o666, number)
    return path


@pytest.mark.parametrize("argv", [DROP_IN, OPTIMIZE], ids=["drop-in", "optimizer"])
def test_a_null_device_is_written_through_and_stays_a_device(tmp_path, model, argv, capsys):
    null = device(tmp_path / "null", NULL)
    assert bpwopt(argv, model, null) == 0
    assert stat.S_ISCHR(null.stat().st_mode) and null.stat().st_rdev == NULL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "null"]


def test_a_full_device_is_a_one_line_error_and_stays_a_device(tmp_path, model, capsys):
    full = device(tmp_path / "full", FULL)
    assert bpwopt(DROP_IN, model, full) == 1
    assert one_error_line(capsys) == f"cannot write {full}: No space left on device"
    assert stat.S_ISCHR(full.stat().st_mode) and full.stat().st_rdev == FULL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "model.gguf"]


def test_a_fifo_receives_exactly_the_files_bytes(tmp_path, model):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(fifo.read_bytes()))
    reader.start()
    assert bpwopt(DROP_IN, model, fifo) == 0
    reader.join(timeout=60)
    assert bytes(received) == plain_bytes(DROP_IN, model, tmp_path / "plain")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.parametrize("argv", [DROP_IN, OPTIMIZE], ids=["drop-in", "optimizer"])
def test_a_symbolic_link_keeps_being_a_link_and_its_target_is_replaced(tmp_path, model, argv):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model-q8.gguf").write_bytes(PREVIOUS)
    link = tmp_path / "out.gguf"
    link.symlink_to(elsewhere / "model-q8.gguf")
    assert bpwopt(argv, model, link) == 0
    assert link.is_symlink() and os.readlink(link) == str(elsewhere / "model-q8.gguf")
    assert (elsewhere / "model-q8.gguf").read_bytes() == plain_bytes(argv, model, tmp_path / "plain")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["model-q8.gguf"]  # no temporary left beside it


def test_a_dangling_link_gets_its_target_created(tmp_path, model):
    link = tmp_path / "out.gguf"
    link.symlink_to("new.gguf")
    assert bpwopt(DROP_IN, model, link) == 0
    assert link.is_symlink() and (tmp_path / "new.gguf").read_bytes() == plain_bytes(DROP_IN, model, tmp_path / "p")


def test_a_link_loop_is_refused(tmp_path, model, capsys):
    (tmp_path / "a.gguf").symlink_to("b.gguf")
    (tmp_path / "b.gguf").symlink_to("a.gguf")
    assert bpwopt(DROP_IN, model, tmp_path / "a.gguf") == 1
    assert one_error_line(capsys) == f"cannot write {tmp_path / 'a.gguf'}: Too many levels of symbolic links"


@pytest.mark.parametrize("alias", ["hard link", "symbolic link", "dot-dot path"])
@pytest.mark.parametrize("argv", [DROP_IN, OPTIMIZE], ids=["drop-in", "optimizer"])
def test_the_input_under_another_name_is_refused_and_kept(tmp_path, model, argv, alias, capsys):
    (tmp_path / "sub").mkdir()
    out = {"hard link": tmp_path / "hard.gguf", "symbolic link": tmp_path / "soft.gguf",
           "dot-dot path": tmp_path / "sub" / ".." / "model.gguf"}[alias]  # fmt: skip
    if alias == "hard link":
        os.link(model, out)
    elif alias == "symbolic link":
        out.symlink_to(model)
    original = model.read_bytes()
    assert bpwopt(argv, model, out, "--allow-requantize") == 1
    assert one_error_line(capsys) == f"input and output files are the same: {out}"
    assert model.read_bytes() == original


@pytest.mark.parametrize("argv", [DROP_IN, OPTIMIZE], ids=["drop-in", "optimizer"])
def test_a_missing_directory_is_refused_before_any_work(tmp_path, model, argv, capsys):
    state = tmp_path / "run.bpw_state"
    assert bpwopt(argv, model, tmp_path / "missing" / "out.gguf", "--state-file", str(state)) == 1
    assert one_error_line(capsys) == f"{tmp_path / 'missing'}: output directory does not exist"
    assert not state.exists()


def test_a_block_device_is_refused(tmp_path, model, capsys):
    node = tmp_path / "disk"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 200))  # a loop device number nobody uses
    assert bpwopt(DROP_IN, model, node) == 1
    assert one_error_line(capsys) == f"{node}: is a block device, not an output file"
    assert stat.S_ISBLK(node.stat().st_mode)


def test_a_state_file_behind_a_link_is_created_at_its_target(tmp_path, model):
    (tmp_path / "states").mkdir()
    link = tmp_path / "run.bpw_state"
    link.symlink_to(tmp_path / "states" / "real.bpw_state")
    assert bpwopt(OPTIMIZE, model, tmp_path / "out.gguf", "--state-file", str(link)) == 0
    assert link.is_symlink()
    with StateFile.open(link, read_identity(link), create=False) as state:  # reopened through the link
        assert state.path == tmp_path / "states" / "real.bpw_state" and state.measurements()


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_state_file_must_be_a_regular_file(tmp_path, model, kind, capsys):
    state = tmp_path / "run.bpw_state"
    device(state, NULL) if kind == "device" else os.mkfifo(state)
    assert bpwopt(OPTIMIZE, model, tmp_path / "out.gguf", "--state-file", str(state)) == 1
    assert one_error_line(capsys) == f"{state}: is not a regular file; a state file must be one"
    assert not (tmp_path / "out.gguf").exists()


def test_a_file_larger_than_the_free_space_is_refused_before_writing(tmp_path):
    """A 1 MiB tmpfs in a user namespace: the 4.5 MB output is refused with both numbers, nothing written there."""
    model = write_one_block_model(tmp_path / "model.gguf", rows=8192)
    needed = len(plain_bytes(DROP_IN, model, tmp_path / "plain"))
    small = tmp_path / "small"
    small.mkdir()
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {small} && "
        f"{sys.executable} -m bpwopt.cli --quiet {model} {small}/out.gguf Q8_0; status=$?; "
        f"ls -A {small}; exit $status"
    )
    run = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines() == [
        f"bpwopt: error: not enough space for {small}/out.gguf: it needs {needed:,} bytes, {small} has 1,048,576 free"
    ]
    assert run.stdout == ""  # the tmpfs held no file, not even a temporary
