"""Where an output goes, decided before any work: written through, replaced atomically, or refused.

Atomic replace (a temporary beside the file, renamed over it) is right for
regular files only: renamed over /dev/null it turns the device node into a
file, and over a symbolic link it turns the link into a file. So, as
llama-quantize does, a character device or a FIFO is written through; a
link is followed to the file it names, which is then replaced atomically in
its own directory, the link kept; anything else that is not a regular file
(a directory, a block device, a socket) is refused, as are a missing
directory, a file or directory the user cannot write, a link loop, and an
output that is one of the inputs under another name (hard link, symlink,
`..`). Every writer of the package (models and their shards, state files,
plots) asks here first, and the model writers also ask whether the file fits
the free space of its filesystem before writing it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bpwopt.errors import BpwoptError
from bpwopt.formats.files import fsync_path

_REFUSED_KINDS = {stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}
_STREAM_KINDS = (stat.S_IFCHR, stat.S_IFIFO)


@dataclass(frozen=True)
class OutputPath:
    """An output the checks allow: where its bytes go, and how."""

    requested: Path  # as the user named it (messages name it)
    path: Path  # where the bytes go: the file a symbolic link names, else requested
    stream: bool  # a character device or FIFO: opened and written through, never replaced or fsynced


def writable_output(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), what: str = "output"
) -> OutputPath:
    """Check an output for writing; BpwoptError (one line naming the path) where it cannot be written.

    inputs: files the run reads (model shards, imatrix, state), which the
    output may not be under any name. what: the output's role in messages.
    """
    requested, target, status = _inspect(Path(path), inputs, what)
    if status is not None and not _may_write(target):
        raise BpwoptError(f"cannot write {requested}: Permission denied")
    stream = status is not None and stat.S_IFMT(status.st_mode) in _STREAM_KINDS
    if not stream:
        _check_directory(requested, target.parent, what)
    return OutputPath(requested, target, stream)


def state_file_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Where a state file is opened or created: a link's target; refused unless a regular file or absent.

    A state is read back and SQLite keeps -wal and -shm files beside it, so a
    device or FIFO cannot hold one. A missing directory and a read-only file
    are left to the state (it creates the default state/ folder, and says
    which of its uses a read-only file allows).
    """
    requested, target, status = _inspect(Path(path), inputs, "state")
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise BpwoptError(f"{requested}: is not a regular file; a state file must be one")
    return target


def check_free_space(targets: Sequence[OutputPath], file_bytes: int) -> None:
    """Refuse, before writing, file_bytes (all targets together) that a target's filesystem cannot hold.

    The old file stays until the new one is renamed over it, so it frees
    nothing; a temporary left by a killed run is reused, so its bytes count
    as free. Written-through devices and FIFOs are not checked.
    """
    for directory in dict.fromkeys(t.path.parent for t in targets if not t.stream):
        reusable = sum(_size(temporary_path(t.path)) for t in targets if not t.stream and t.path.parent == directory)
        free = _free_bytes(directory) + reusable
        if file_bytes > free:
            raise BpwoptError(
                f"not enough space for {targets[0].requested}: it needs {file_bytes:,} bytes, "
                f"{directory} has {free:,} free"
            )


def with_budget(path: Path, budget: str) -> Path:
    """path with a budget appended to its name (OUT.gguf, "2gb" -> OUT-2gb.gguf): one file of a ladder.

    Anything in budget but letters, digits, "_" and "." becomes "_", so a size never names a folder.
    """
    label = re.sub(r"[^\w.]+", "_", budget)
    return path.with_name(f"{path.stem}-{label}{path.suffix}")


def temporary_path(path: Path) -> Path:
    """PATH.tmp: where a regular file is written before it is renamed over path."""
    return path.with_name(path.name + ".tmp")


def write_small_file(path: str | os.PathLike, data: bytes, what: str = "output") -> Path:
    """Write data (held in memory: a plot, a report) by the rules above; returns the path as requested.

    A regular file is replaced atomically: PATH.tmp, fsynced, renamed over it.
    """
    target = writable_output(path, what=what)
    try:
        if target.stream:
            with open(target.path, "wb") as stream:
                stream.write(data)
            return target.requested
        temporary = temporary_path(target.path)
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        fsync_path(target.path.parent)
    except OSError as error:
        raise BpwoptError(f"cannot write {target.requested}: {error.strerror or error}") from None
    return target.requested


def _inspect(
    requested: Path, inputs: Iterable[str | os.PathLike], what: str
) -> tuple[Path, Path, os.stat_result | None]:
    """(requested, the file it names, that file's status or None if absent), refused where no file can go."""
    if not requested.name or requested.name in (".", ".."):  # `.`, `..`, `/`: no file name to write to
        raise BpwoptError(f"{requested}: is a directory, not {_article(what)} file")
    target = _link_target(requested)
    try:
        status = os.stat(target)
    except FileNotFoundError:
        return requested, target, None
    except OSError as error:
        raise BpwoptError(f"cannot write {requested}: {error.strerror or error}") from None
    kind = stat.S_IFMT(status.st_mode)
    if kind in _REFUSED_KINDS:
        raise BpwoptError(f"{requested}: is {_REFUSED_KINDS[kind]}, not {_article(what)} file")
    if any(_same_file(status, name) for name in inputs):
        raise BpwoptError(f"input and output files are the same: {requested}")
    return requested, target, status


def _check_directory(requested: Path, directory: Path, what: str) -> None:
    if not directory.is_dir():
        raise BpwoptError(f"{directory}: {what} directory does not exist")
    if not _may_write(directory, os.W_OK | os.X_OK):
        raise BpwoptError(f"cannot write {requested}: Permission denied (its temporary goes in {directory})")


def _may_write(path: Path, mode: int = os.W_OK) -> bool:
    """Whether this process may write path, judged by its effective ids and capabilities, as open(2) will be."""
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _link_target(path: Path) -> Path:
    """The file a symbolic link (or a chain of them) names; path itself when it is no link."""
    if not path.is_symlink():
        return path
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:  # a dangling link: its target is created, as open(2) creates it
        return Path(os.path.realpath(path))
    except OSError as error:  # a loop
        raise BpwoptError(f"cannot write {path}: {error.strerror or error}") from None


def _same_file(status: os.stat_result, name: str | os.PathLike) -> bool:
    try:
        other = os.stat(name)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (status.st_dev, status.st_ino)


def _free_bytes(directory: Path) -> int:
    """Bytes this process may still write on directory's filesystem (root may use the reserved blocks)."""
    info = os.statvfs(directory)
    return (info.f_bfree if os.geteuid() == 0 else info.f_bavail) * info.f_frsize


def _size(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _article(what: str) -> str:
    return f"an {what}" if what[0] in "aeiou" else f"a {what}"
