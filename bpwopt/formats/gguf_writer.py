"""Streaming, atomic GGUF output: header first, then each tensor as it is produced.

Target types are known before any data is written, so every size and offset
is too: the header goes out first and tensor data follows slab by slab, so
peak memory stays near one slab, not the model. A regular file goes to
`OUT.tmp` beside the output (beside the file a symbolic link names), is
fsynced, and is renamed over OUT only when complete; on any failure the
temporary file is removed and OUT is untouched. A character device or FIFO
(/dev/null, a pipe) is written through (`bpwopt.formats.output_paths`).
OUT.tmp is locked while written: a second writer of the same OUT is refused,
and a temporary left behind by a killed run is taken over by the next one.
The shards of a split model are written as one unit (`write_gguf_files`).
Metadata entries copied from the input keep their exact bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType

from bpwopt.errors import BpwoptError
from bpwopt.formats.files import fsync_path
from bpwopt.formats.output_paths import OutputPath, temporary_path, writable_output

GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip


def _string(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded


def encode_kv(key: str, value_type: GGUFValueType, value, item_type: GGUFValueType | None = None) -> bytes:
    """One metadata entry in GGUF's binary layout (scalars, strings, and arrays of them)."""

    def scalar(kind: GGUFValueType, item) -> bytes:
        return _string(item) if kind == GGUFValueType.STRING else struct.pack(_SCALAR_FORMATS[kind], item)

    payload = struct.pack("<I", value_type)
    if value_type == GGUFValueType.ARRAY:
        payload += struct.pack("<IQ", item_type, len(value)) + b"".join(scalar(item_type, v) for v in value)
    else:
        payload += scalar(value_type, value)
    return _string(key) + payload


def copied_kv(field: gguf.ReaderField) -> bytes:
    """A metadata entry of the input, byte for byte."""
    return b"".join(np.asarray(part).tobytes() for part in field.parts)


@dataclass(frozen=True)
class TensorSlot:
    """One output tensor's header entry: name, shape (ggml order, row length first), type, bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: gguf.GGMLQuantizationType
    nbytes: int


def _padding(size: int, alignment: int) -> int:
    return -size % alignment


def padded_size(size: int, alignment: int = DEFAULT_ALIGNMENT) -> int:
    """Bytes a tensor of `size` data bytes occupies in the file, alignment padding included."""
    return size + _padding(size, alignment)


def file_size(kv_entries: list[bytes], slots: list[TensorSlot], alignment: int = DEFAULT_ALIGNMENT) -> int:
    """The exact size write_gguf will give this file, known before any tensor is produced."""
    return len(_header(kv_entries, slots, alignment)) + sum(padded_size(s.nbytes, alignment) for s in slots)


def _header(kv_entries: list[bytes], slots: list[TensorSlot], alignment: int) -> bytes:
    parts = [b"GGUF", struct.pack("<IQQ", GGUF_VERSION, len(slots), len(kv_entries)), *kv_entries]
    offset = 0
    for slot in slots:
        parts.append(_string(slot.name))
        parts.append(struct.pack("<I", len(slot.shape)) + struct.pack(f"<{len(slot.shape)}Q", *slot.shape))
        parts.append(struct.pack("<IQ", slot.ggml_type, offset))
        offset += slot.nbytes + _padding(slot.nbytes, alignment)
    header = b"".join(parts)
    return header + bytes(_padding(len(header), alignment))


@dataclass(frozen=True)
class GGUFLayout:
    """One output file as known before any tensor is produced: metadata entries, tensor slots, alignment."""

    kv_entries: list[bytes]
    slots: list[TensorSlot]
    alignment: int = DEFAULT_ALIGNMENT

    @property
    def file_bytes(self) -> int:
        return file_size(self.kv_entries, self.slots, self.alignment)


def write_gguf(
    path: str | Path,
    kv_entries: list[bytes],
    slots: list[TensorSlot],
    produce: Callable[[int], Iterable[bytes | np.ndarray]],
    alignment: int = DEFAULT_ALIGNMENT,
    on_tensor_done: Callable[[TensorSlot], None] | None = None,
) -> int:
    """Write a GGUF atomically; produce(i) yields the data of slots[i] in pieces. Returns file bytes.

    A tensor whose pieces do not add up to its slot's size is an error (the
    file would not load), raised before the output is renamed into place.
    """
    layout = GGUFLayout(kv_entries, slots, alignment)
    return write_gguf_files([Path(path)], [layout], lambda _, index: produce(index), on_tensor_done)


def write_gguf_files(
    paths: Sequence[Path],
    layouts: Sequence[GGUFLayout],
    produce: Callable[[int, int], Iterable[bytes | np.ndarray]],
    on_tensor_done: Callable[[TensorSlot], None] | None = None,
) -> int:
    """Write layouts[f] to paths[f] as one unit, the first file being the one a reader opens; returns total bytes.

    produce(f, i) yields the data of layouts[f].slots[i]. Every regular file
    goes to its own locked PATH.tmp (beside the file a symbolic link names)
    and none is renamed before all are complete; a character device or FIFO
    is written through (bpwopt.formats.output_paths). With several files (a
    split model's shards) the old first file is then removed, the others
    renamed into place, and the first renamed last: a run killed in between
    leaves later shards without a first one, which neither llama.cpp nor
    bpwopt can open (both open a split model by its first shard), never a
    first shard next to shards of another run. Re-running the command
    completes the set.
    """
    targets = [writable_output(path) for path in paths]
    replaced = [target for target in targets if not target.stream]
    handles: list = []  # open (and so locked) outputs, in order; closing a temporary releases its lock
    current = targets[0].requested
    try:
        for target in targets:
            current = target.requested
            handles.append(_open_output(target))
        total = 0
        for index, (target, layout, handle) in enumerate(zip(targets, layouts, handles, strict=True)):
            current = target.requested
            total += _write_file(handle, layout, lambda slot, file=index: produce(file, slot), on_tensor_done,
                                 durable=not target.stream)  # fmt: skip
        current = targets[0].requested
        _rename_into_place(replaced)  # under the locks: no other writer can be taking these over
    except BaseException as error:
        for target in targets[: len(handles)]:
            if not target.stream:
                _discard(temporary_path(target.path))  # before the locks go: what is removed is ours
        for handle in handles:
            with contextlib.suppress(OSError):  # a full disk fails the flush at close again
                handle.close()
        if isinstance(error, OSError):
            raise BpwoptError(f"cannot write {current}: {error.strerror or error}") from error
        raise
    for handle in handles:
        handle.close()  # a device's last buffered bytes fail here, if anywhere
    for directory in dict.fromkeys(target.path.parent for target in replaced):
        fsync_path(directory)
    return total


def _open_output(target: OutputPath):
    """A binary file object to write target's bytes to: the device or FIFO itself, else PATH.tmp, locked."""
    if target.stream:
        try:
            return open(target.path, "wb", buffering=1 << 20)  # closed by write_gguf_files
        except OSError as error:
            raise BpwoptError(f"cannot write {target.requested}: {error.strerror or error}") from error
    return os.fdopen(_locked_temporary(temporary_path(target.path), target.requested), "wb")


def _write_file(
    handle,
    layout: GGUFLayout,
    produce: Callable[[int], Iterable[bytes | np.ndarray]],
    on_tensor_done: Callable[[TensorSlot], None] | None,
    durable: bool = True,
) -> int:
    """Header, then every tensor padded to the alignment, then (durable) fsync; returns the bytes written.

    The bytes are counted, not asked of the file: a FIFO has no position.
    """
    header = _header(layout.kv_entries, layout.slots, layout.alignment)
    handle.write(header)
    total = len(header)
    for index, slot in enumerate(layout.slots):
        written = sum(_write_piece(handle, piece) for piece in produce(index))
        if written != slot.nbytes:
            raise BpwoptError(f"internal error: {slot.name} produced {written} bytes, expected {slot.nbytes}")
        padding = _padding(written, layout.alignment)
        handle.write(bytes(padding))
        total += written + padding
        if on_tensor_done:
            on_tensor_done(slot)
    handle.flush()
    if durable:
        os.fsync(handle.fileno())
    return total


def _rename_into_place(targets: list[OutputPath]) -> None:
    """Publish complete temporaries; with several files the first appears only once all others have."""
    if not targets:
        return
    if len(targets) > 1:
        _discard(targets[0].path)
        for target in targets[1:]:
            os.replace(temporary_path(target.path), target.path)
        for directory in dict.fromkeys(target.path.parent for target in targets):
            fsync_path(directory)  # the later shards are durable before the first one exists
    os.replace(temporary_path(targets[0].path), targets[0].path)


def _locked_temporary(temporary: Path, path: Path) -> int:
    """A descriptor of OUT.tmp, emptied and exclusively locked (flock) until closed.

    A temporary left by a killed run is taken over: the kernel dropped its
    lock with the process. One that is locked belongs to a live writer of the
    same output, which is refused rather than interleaved with.
    """
    while True:
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise BpwoptError(f"cannot write {path}: {error.strerror or error}") from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise BpwoptError(f"{path} is being written by another bpwopt process right now") from None
        opened = os.fstat(descriptor)
        try:
            current = os.stat(temporary, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            os.ftruncate(descriptor, 0)
            return descriptor
        os.close(descriptor)  # the writer we raced renamed it into place meanwhile: start a new one


def _write_piece(handle, piece: bytes | np.ndarray) -> int:
    data = memoryview(np.ascontiguousarray(piece)).cast("B") if isinstance(piece, np.ndarray) else piece
    handle.write(data)
    return len(data)


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
