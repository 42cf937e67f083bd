"""`bpwopt inspect`: what a GGUF holds, per tensor, per layer and in total.

Reads only the header and tensor table (the gguf reader memory-maps the
file), so it is cheap on any model size. bpw here is llama.cpp's: 8 × bytes of
tensor data / elements. `open_gguf` is also how every other stage opens a
GGUF: the header is first walked with each count and offset checked against
the file (`check_gguf_layout`), so a hostile or damaged file is refused in
one line before gguf's reader, which trusts what it reads, touches it.
"""

from __future__ import annotations

import functools
import mmap
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import GGUFValueType

from bpwopt.errors import BpwoptError

_LAYER = re.compile(r"^blk\.(\d+)\.")
_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)  # llama.cpp refuses version 1 and any later one
_MAX_DIMS = 4  # GGML_MAX_DIMS
# Far above any real vocabulary (262k tokens); gguf's reader builds one numpy object per item, so a
# larger count in a small file would cost minutes and gigabytes before any other check could run.
_MAX_ARRAY_ITEMS = 1 << 21
_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str
    shape: tuple[int, ...]  # ggml order: row length first
    elements: int
    data_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.data_bytes / self.elements

    @property
    def layer(self) -> int | None:
        match = _LAYER.match(self.name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class GroupTotal:
    """Elements and bytes of a set of tensors (a layer, a type, the whole model)."""

    label: str
    tensors: int
    elements: int
    data_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.data_bytes / self.elements if self.elements else 0.0


@dataclass(frozen=True)
class ModelSummary:
    path: Path
    architecture: str
    file_bytes: int
    tensors: list[TensorInfo]

    def total(self) -> GroupTotal:
        return _group("total", self.tensors)

    def by_layer(self) -> list[GroupTotal]:
        groups = defaultdict(list)
        for tensor in self.tensors:
            groups[tensor.layer].append(tensor)
        layers = sorted(key for key in groups if key is not None)
        totals = [_group(f"blk.{layer}", groups[layer]) for layer in layers]
        if None in groups:
            totals.append(_group("other", groups[None]))
        return totals

    def by_type(self) -> list[GroupTotal]:
        groups = defaultdict(list)
        for tensor in self.tensors:
            groups[tensor.type_name].append(tensor)
        return [_group(name, members) for name, members in sorted(groups.items())]


def _group(label: str, tensors: list[TensorInfo]) -> GroupTotal:
    return GroupTotal(
        label, len(tensors), sum(t.elements for t in tensors), sum(t.data_bytes for t in tensors)
    )


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF memory-mapped, turning every way a file can be unreadable into one BpwoptError.

    Readers are reused while the file is unchanged (same inode, size and
    mtime): gguf's reader spends seconds walking a 50k-token vocabulary, and
    re-solving one model for many targets in one process opens it many times.
    """
    path = Path(path)
    if not path.is_file():
        raise BpwoptError(f"{path}: not a regular file" if path.exists() else f"{path}: no such file")
    status = path.stat()
    return _open_unchanged(path.resolve(), status.st_ino, status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_unchanged(path: Path, inode: int, size: int, mtime_ns: int) -> gguf.GGUFReader:
    try:
        check_gguf_layout(path)
        return gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError, OverflowError, TypeError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BpwoptError(f"{path}: not a valid GGUF file, truncated or corrupt ({detail})") from error


class _Header:
    """Bounds-checked little-endian reads over a memory-mapped GGUF; running off the end is a ValueError."""

    def __init__(self, data: mmap.mmap | bytes) -> None:
        self.data, self.offset = data, 0

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, size: int, what: str) -> int:
        """Skip size bytes, returning where they start."""
        if size > self.remaining():
            raise ValueError(f"{what} at byte {self.offset:,} needs {size:,} bytes, {self.remaining():,} are left")
        start = self.offset
        self.offset += size
        return start

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        """A uint64 count, refused when that many items of at least min_item_bytes cannot fit in the rest."""
        n = self.unpack("<Q", what)
        if n > self.remaining() // min_item_bytes:
            raise ValueError(f"{what} {n:,} cannot fit in the {self.remaining():,} bytes left")
        return n

    def string(self, what: str) -> bytes:
        size = self.unpack("<Q", f"length of {what}")
        start = self.take(size, what)
        return bytes(self.data[start:start + size])

    def text(self, what: str) -> str:
        try:
            return self.string(what).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} before byte {self.offset} is not UTF-8") from None


def check_gguf_layout(path: str | Path) -> None:
    """Walk a GGUF header with every count and offset checked against the file, as llama.cpp's loader does.

    gguf's reader trusts the header: a count of 2^63 array items makes it loop
    and allocate for ever, and an offset that is misaligned or past the end is
    taken as is. This walk allocates nothing from a count, so the reader only
    sees files whose layout is sound. Raises ValueError naming the first problem.
    """
    with open(path, "rb") as handle:
        if handle.seek(0, 2) < 24:
            raise ValueError(f"{handle.tell()} bytes is too short for a GGUF header")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check_layout(_Header(data))


def _check_layout(header: _Header) -> None:
    magic = bytes(header.data[:4])
    header.take(4, "magic")
    if magic != _GGUF_MAGIC:
        raise ValueError(f"magic {magic!r} is not {_GGUF_MAGIC!r}")
    version = header.unpack("<I", "version")
    if version not in _GGUF_VERSIONS:
        swapped = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise ValueError(f"GGUF version {version}{swapped} is not supported")
    tensor_count = header.count("tensor count", 8 + 4 + 8 + 4 + 8)  # empty name, 1 dim, type, offset
    kv_count = header.count("metadata count", 8 + 4 + 1)  # empty key, type, a one-byte value
    alignment = _check_metadata(header, kv_count)
    tensors = _check_tensor_infos(header, tensor_count, alignment)
    data_start = header.offset + -header.offset % alignment
    for name, offset, nbytes in tensors:
        if data_start + offset + nbytes > len(header.data):
            raise ValueError(
                f"data of tensor {name} ends at byte {data_start + offset + nbytes:,}, past the end of the file "
                f"({len(header.data):,} bytes)"
            )


def _check_metadata(header: _Header, kv_count: int) -> int:
    """Walk the key-value entries; returns the data alignment (general.alignment, else GGUF's 32)."""
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    keys = set()
    for index in range(kv_count):
        key = header.text(f"key {index}")
        if key in keys:
            raise ValueError(f"duplicate metadata key {key}")
        keys.add(key)
        value_type = _value_type(header.unpack("<I", f"type of {key}"), key)
        if key != "general.alignment":
            _skip_value(header, value_type, key)
            continue
        if value_type != GGUFValueType.UINT32:
            raise ValueError(f"general.alignment is {value_type.name}, not UINT32")
        alignment = header.unpack("<I", "general.alignment")
        if alignment == 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment} is not a power of two")
    return alignment


def _check_tensor_infos(header: _Header, tensor_count: int, alignment: int) -> list[tuple[str, int, int]]:
    """Walk the tensor table; returns (name, data offset, data bytes) of each tensor."""
    tensors = []
    names = set()
    expected_offset = 0
    for index in range(tensor_count):
        name = header.text(f"name of tensor {index}")
        if name in names:
            raise ValueError(f"duplicate tensor name {name}")
        names.add(name)
        n_dims = header.unpack("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions, expected 1 to {_MAX_DIMS}")
        shape = [header.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
        raw_type = header.unpack("<I", f"type of {name}")
        try:
            ggml_type = gguf.GGMLQuantizationType(raw_type)
            block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name} has unknown ggml type {raw_type}") from None
        if 0 in shape:
            raise ValueError(f"tensor {name} has shape {shape}: no elements")
        if shape[0] % block_size:
            raise ValueError(f"tensor {name}: row length {shape[0]} is not a multiple of {ggml_type.name}'s blocks")
        elements = 1
        for size in shape:
            elements *= size
        if elements >= 2**63:
            raise ValueError(f"tensor {name} has shape {shape}: too many elements")
        nbytes = elements // block_size * block_bytes
        offset = header.unpack("<Q", f"data offset of {name}")
        if offset != expected_offset:  # llama.cpp's rule: data in table order, each tensor aligned, no gaps
            raise ValueError(f"tensor {name} has data offset {offset:,}, expected {expected_offset:,}")
        expected_offset += nbytes + -nbytes % alignment
        tensors.append((name, offset, nbytes))
    return tensors


def _value_type(raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ValueError(f"metadata {key} has unknown value type {raw}") from None


def _skip_value(header: _Header, value_type: GGUFValueType, key: str) -> None:
    if value_type == GGUFValueType.STRING:
        header.string(f"value of {key}")
    elif value_type == GGUFValueType.ARRAY:
        item_type = _value_type(header.unpack("<I", f"item type of {key}"), key)
        if item_type == GGUFValueType.ARRAY:
            raise ValueError(f"metadata {key} is an array of arrays")
        item_bytes = 8 if item_type == GGUFValueType.STRING else _SCALAR_BYTES[item_type]
        n_items = header.count(f"item count of {key}", item_bytes)
        if n_items > _MAX_ARRAY_ITEMS:
            raise ValueError(f"metadata {key} has {n_items:,} items, more than {_MAX_ARRAY_ITEMS:,}")
        if item_type == GGUFValueType.STRING:
            _skip_strings(header, n_items, key)
        else:
            header.take(n_items * item_bytes, f"items of {key}")
    else:
        header.take(_SCALAR_BYTES[value_type], f"value of {key}")


def _skip_strings(header: _Header, n_items: int, key: str) -> None:
    """The items of a string array (a vocabulary: 262k of them in Gemma 3), in a tight loop."""
    data, offset, end = header.data, header.offset, len(header.data)
    read_length = struct.Struct("<Q").unpack_from
    for index in range(n_items):
        offset += 8
        if offset > end or (offset := offset + read_length(data, offset - 8)[0]) > end:
            raise ValueError(f"item {index} of {key} runs past the end of the file")
    header.offset = offset


def inspect_gguf(path: str | Path) -> ModelSummary:
    reader = open_gguf(path)
    architecture = reader.fields.get("general.architecture")
    tensors = [
        TensorInfo(
            name=tensor.name,
            type_name=tensor.tensor_type.name,
            shape=tuple(int(n) for n in tensor.shape),
            elements=int(tensor.n_elements),
            data_bytes=int(tensor.n_bytes),
        )
        for tensor in reader.tensors
    ]
    return ModelSummary(
        path=Path(path),
        architecture=architecture.contents() if architecture is not None else "unknown",
        file_bytes=Path(path).stat().st_size,
        tensors=tensors,
    )


def _total_row(total: GroupTotal) -> str:
    return (
        f"{total.label:<28} {total.tensors:>7} {total.elements:>14,} {total.data_bytes:>14,} "
        f"{total.bits_per_weight:>7.3f}"
    )


def format_summary(summary: ModelSummary, per_tensor: bool = False) -> str:
    """The human-readable report: types, layers, totals (and every tensor if asked)."""
    header = f"{'':<28} {'tensors':>7} {'elements':>14} {'bytes':>14} {'bpw':>7}"
    lines = [
        f"{summary.path}: {summary.architecture}, {len(summary.tensors)} tensors, "
        f"{summary.file_bytes:,} bytes on disk",
        "",
        "by type",
        header,
        *(_total_row(total) for total in summary.by_type()),
        "",
        "by layer",
        header,
        *(_total_row(total) for total in summary.by_layer()),
        "",
        _total_row(summary.total()),
    ]
    if per_tensor:
        lines += ["", f"{'tensor':<32} {'type':<8} {'shape':<18} {'bytes':>12} {'bpw':>7}"]
        lines += [
            f"{t.name:<32} {t.type_name:<8} {'x'.join(map(str, t.shape)):<18} "
            f"{t.data_bytes:>12,} {t.bits_per_weight:>7.3f}"
            for t in summary.tensors
        ]
    return "\n".join(lines)


def summary_as_dict(summary: ModelSummary) -> dict:
    """The same report as plain data, for --json."""

    def total(group: GroupTotal) -> dict:
        return {
            "label": group.label,
            "tensors": group.tensors,
            "elements": group.elements,
            "bytes": group.data_bytes,
            "bpw": group.bits_per_weight,
        }

    return {
        "path": str(summary.path),
        "architecture": summary.architecture,
        "file_bytes": summary.file_bytes,
        "total": total(summary.total()),
        "by_type": [total(group) for group in summary.by_type()],
        "by_layer": [total(group) for group in summary.by_layer()],
        "tensors": [
            {
                "name": t.name,
                "type": t.type_name,
                "shape": list(t.shape),
                "elements": t.elements,
                "bytes": t.data_bytes,
                "bpw": t.bits_per_weight,
            }
            for t in summary.tensors
        ],
    }
