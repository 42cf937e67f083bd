"""GGUF files opened in one checked walk of the header, metadata arrays kept as single views of the file.

Every stage opens its input through `inspector.open_gguf`, which builds a
`LazyGGUFReader`: what bpwopt uses of gguf's `GGUFReader` (`fields`,
`tensors`, `data`, `alignment`, `data_offset`) with the same meaning, without
its cost. gguf's reader builds numpy views for every item of every metadata
array, two per vocabulary string: seconds and hundreds of MiB for a 50k–262k
token vocabulary. Here an array is one view, of its items when they are
scalars or of its byte span when they are strings, decoded only when its
`contents()` are asked for. The same walk checks every count, length and
offset against the file before anything is built from it (gguf's reader
trusts them: a count of 2^63 array items makes it loop for ever), so a
hostile or damaged file is refused with a ValueError naming the first problem.
"""

from __future__ import annotations

import functools
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from bpwopt.errors import BpwoptError

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)  # llama.cpp refuses version 1 and any later one
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_DTYPES = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"), GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"), GGUFValueType.FLOAT64: np.dtype("<f8"),
}  # fmt: skip
# Tensor data gguf's reader exposes as numbers; every other type is exposed as its bytes, as there.
_TENSOR_DTYPES = {
    GGMLQuantizationType.F16: "<f2", GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F64: "<f8",
    GGMLQuantizationType.I8: "<i1", GGMLQuantizationType.I16: "<i2", GGMLQuantizationType.I32: "<i4",
    GGMLQuantizationType.I64: "<i8",
}  # fmt: skip
_U64 = struct.Struct("<Q")


class ArrayField(gguf.ReaderField):
    """A metadata array whose items are one part: a view of the scalars, or the uint8 span of the strings.

    Parts are key length, key, ARRAY, item type, item count, items, so joined
    they are still the entry's bytes as in the file; `data` is [5] and `types`
    is [ARRAY, item type], the item type kept even for an empty array (gguf's
    reader drops it there).
    """

    __slots__ = ()

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        """The items as Python values, all of them, one (int) or a slice, as gguf's ReaderField gives them.

        Strings are decoded here, all of them on each call: a vocabulary is read
        whole or not at all.
        """
        items = self.parts[-1]
        if self.types[-1] == GGUFValueType.STRING:
            return _decode_strings(items, int(self.parts[-2][0]))[index_or_slice]
        return items[index_or_slice].tolist()


def _decode_strings(span: np.ndarray, count: int) -> list[str]:
    """The `count` length-prefixed UTF-8 strings packed in span (uint8), as GGUF stores an array of strings."""
    buffer, offset, strings = memoryview(span), 0, []
    for _ in range(count):
        length = _U64.unpack_from(buffer, offset)[0]
        offset += 8 + length
        strings.append(str(buffer[offset - length:offset], "utf-8"))
    return strings


class _Cursor:
    """Bounds-checked little-endian reads over the memory-mapped file; running off its end is a ValueError."""

    def __init__(self, data: np.memmap) -> None:
        self.data, self.buffer, self.offset = data, memoryview(data), 0

    def remaining(self) -> int:
        return len(self.buffer) - self.offset

    def take(self, size: int, what: str) -> int:
        """Skip size bytes, returning where they start."""
        if size > self.remaining():
            raise ValueError(f"{what} at byte {self.offset:,} needs {size:,} bytes, {self.remaining():,} are left")
        self.offset += size
        return self.offset - size

    def view(self, dtype: np.dtype | str, count: int, what: str) -> np.ndarray:
        """The next count items of dtype, as a view of the file."""
        dtype = np.dtype(dtype)
        start = self.take(count * dtype.itemsize, what)
        return self.data[start:self.offset].view(dtype)

    def count(self, what: str, min_item_bytes: int) -> np.ndarray:
        """A uint64 count (a one-item view), refused when that many items of min_item_bytes cannot fit in the rest."""
        count = self.view("<u8", 1, what)
        if int(count[0]) > self.remaining() // min_item_bytes:
            raise ValueError(f"{what} {int(count[0]):,} cannot fit in the {self.remaining():,} bytes left")
        return count

    def string(self, what: str) -> tuple[np.ndarray, np.ndarray, str]:
        """A length-prefixed UTF-8 string: its length and its bytes as views, and its text."""
        length = self.view("<u8", 1, f"length of {what}")
        encoded = self.view("<u1", int(length[0]), what)
        try:
            return length, encoded, str(self.buffer[self.offset - len(encoded):self.offset], "utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} before byte {self.offset:,} is not UTF-8") from None

    def skip_strings(self, count: int, what: str) -> np.ndarray:
        """The span of count length-prefixed strings (a vocabulary: 262k of them in Gemma 3), in a tight loop."""
        buffer, start, offset, end = self.buffer, self.offset, self.offset, len(self.buffer)
        for index in range(count):
            offset += 8
            if offset > end or (offset := offset + _U64.unpack_from(buffer, offset - 8)[0]) > end:
                raise ValueError(f"item {index} of {what} runs past the end of the file")
        self.offset = offset
        return self.data[start:offset]


class LazyGGUFReader(gguf.GGUFReader):
    """gguf's GGUFReader, its header walked once with every count checked and metadata arrays as single views.

    gguf's `__init__` is not called: its per-item parse is what this replaces.
    Scalar and string fields, the GGUF.version / tensor_count / kv_count
    pseudo-fields and the tensors are gguf's own ReaderField and ReaderTensor,
    built as gguf builds them (tensor data views of the memory map); arrays
    are ArrayField. Only little-endian files are read, as llama.cpp reads them.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        size = os.path.getsize(path)
        if size < _HEADER_BYTES:
            raise ValueError(f"{size} bytes is too short for a GGUF header")
        self.data = np.memmap(path, mode="r")
        self.endianess = gguf.GGUFEndian.LITTLE
        self.fields = OrderedDict()
        cursor = _Cursor(self.data)
        tensor_count, kv_count = self._read_preamble(cursor)
        for index in range(kv_count):
            field = _metadata_field(cursor, index)
            if field.name in self.fields:
                raise ValueError(f"duplicate metadata key {field.name}")
            self.fields[field.name] = field
        self.alignment = _alignment(self.fields.get("general.alignment"))
        infos = _tensor_infos(cursor, tensor_count, self.alignment)
        self.data_offset = cursor.offset + -cursor.offset % self.alignment
        self.tensors = [_tensor(self.data, self.data_offset, *info) for info in infos]

    def _read_preamble(self, cursor: _Cursor) -> tuple[int, int]:
        """Magic, version and counts, the last three kept as gguf's reader keeps them (GGUF.* fields)."""
        magic = bytes(cursor.buffer[:4])
        cursor.take(4, "magic")
        if magic != _GGUF_MAGIC:
            raise ValueError(f"magic {magic!r} is not {_GGUF_MAGIC!r}")
        version = cursor.view("<u4", 1, "version")
        if int(version[0]) not in _GGUF_VERSIONS:
            swapped = " (a big-endian file?)" if int(version[0]) & 0xFFFF == 0 else ""
            raise ValueError(f"GGUF version {int(version[0])}{swapped} is not supported")
        tensor_count = cursor.count("tensor count", 8 + 4 + 8 + 4 + 8)  # empty name, 1 dim, type, offset
        kv_count = cursor.count("metadata count", 8 + 4 + 1)  # empty key, type, a one-byte value
        for offset, name, part, value_type in (
            (4, "GGUF.version", version, GGUFValueType.UINT32),
            (8, "GGUF.tensor_count", tensor_count, GGUFValueType.UINT64),
            (16, "GGUF.kv_count", kv_count, GGUFValueType.UINT64),
        ):
            self.fields[name] = gguf.ReaderField(offset, name, [part], [0], [value_type])
        return int(tensor_count[0]), int(kv_count[0])


def _metadata_field(cursor: _Cursor, index: int) -> gguf.ReaderField:
    """One key-value entry, its parts views of the file as gguf's reader makes them (arrays: ArrayField)."""
    start = cursor.offset
    key_length, key_bytes, key = cursor.string(f"key {index}")
    raw_type = cursor.view("<u4", 1, f"type of {key}")
    value_type = _value_type(int(raw_type[0]), key)
    head = [key_length, key_bytes, raw_type]
    if value_type == GGUFValueType.STRING:
        length, encoded, _ = cursor.string(f"value of {key}")
        return gguf.ReaderField(start, key, [*head, length, encoded], [4], [value_type])
    if value_type != GGUFValueType.ARRAY:
        value = cursor.view(_SCALAR_DTYPES[value_type], 1, f"value of {key}")
        return gguf.ReaderField(start, key, [*head, value], [3], [value_type])
    raw_item_type = cursor.view("<u4", 1, f"item type of {key}")
    item_type = _value_type(int(raw_item_type[0]), key)
    if item_type == GGUFValueType.ARRAY:
        raise ValueError(f"metadata {key} is an array of arrays")
    item_bytes = 8 if item_type == GGUFValueType.STRING else _SCALAR_DTYPES[item_type].itemsize
    count = cursor.count(f"item count of {key}", item_bytes)
    if item_type == GGUFValueType.STRING:
        items = cursor.skip_strings(int(count[0]), key)
    else:
        items = cursor.view(_SCALAR_DTYPES[item_type], int(count[0]), f"items of {key}")
    return ArrayField(start, key, [*head, raw_item_type, count, items], [5], [value_type, item_type])


def _value_type(raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ValueError(f"metadata {key} has unknown value type {raw}") from None


def _alignment(field: gguf.ReaderField | None) -> int:
    """The data alignment: general.alignment, a power of two, else GGUF's 32."""
    if field is None:
        return gguf.GGUF_DEFAULT_ALIGNMENT
    if field.types != [GGUFValueType.UINT32]:
        raise ValueError(f"general.alignment is {field.types[0].name}, not UINT32")
    alignment = int(field.parts[-1][0])
    if alignment == 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment} is not a power of two")
    return alignment


def _tensor_infos(
    cursor: _Cursor, tensor_count: int, alignment: int
) -> list[tuple[gguf.ReaderField, GGMLQuantizationType, int, int]]:
    """Walk the tensor table: (entry as gguf's reader keeps it, type, elements, data bytes) of each tensor.

    Data offsets must follow llama.cpp's rule: in table order, each tensor
    aligned, no gaps; so each tensor's data is where no other tensor's is.
    """
    infos, names, expected_offset = [], set(), 0
    for index in range(tensor_count):
        start = cursor.offset
        name_length, name_bytes, name = cursor.string(f"name of tensor {index}")
        if name in names:
            raise ValueError(f"duplicate tensor name {name}")
        names.add(name)
        n_dims = cursor.view("<u4", 1, f"dimension count of {name}")
        if not 1 <= int(n_dims[0]) <= _MAX_DIMS:
            raise ValueError(f"tensor {name} has {int(n_dims[0])} dimensions, expected 1 to {_MAX_DIMS}")
        dims = cursor.view("<u8", int(n_dims[0]), f"shape of {name}")
        shape = dims.tolist()
        raw_type = cursor.view("<u4", 1, f"type of {name}")
        try:
            ggml_type = GGMLQuantizationType(int(raw_type[0]))
            block_size, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name} has unknown ggml type {int(raw_type[0])}") from None
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
        data_offset = cursor.view("<u8", 1, f"data offset of {name}")
        if int(data_offset[0]) != expected_offset:
            raise ValueError(f"tensor {name} has data offset {int(data_offset[0]):,}, expected {expected_offset:,}")
        expected_offset += nbytes + -nbytes % alignment
        parts = [name_length, name_bytes, n_dims, dims, raw_type, data_offset]
        infos.append((gguf.ReaderField(start, name, parts, [1, 3, 4, 5]), ggml_type, elements, nbytes))
    return infos


def _tensor(
    data: np.memmap,
    data_start: int,
    info: gguf.ReaderField,
    ggml_type: GGMLQuantizationType,
    elements: int,
    nbytes: int,
) -> gguf.ReaderTensor:
    """A tensor as gguf's reader gives it: numbers for float and integer types, bytes for quantized ones."""
    start = data_start + int(info.parts[5][0])
    if start + nbytes > len(data):
        raise ValueError(
            f"data of tensor {info.name} ends at byte {start + nbytes:,}, "
            f"past the end of the file ({len(data):,} bytes)"
        )
    dims = info.parts[3]
    numpy_shape = tuple(reversed(dims.tolist()))
    raw = data[start:start + nbytes]
    if ggml_type in _TENSOR_DTYPES:
        array = raw.view(_TENSOR_DTYPES[ggml_type]).reshape(numpy_shape)
    else:
        array = raw.reshape(gguf.quants.quant_shape_to_byte_shape(numpy_shape, ggml_type))
    return gguf.ReaderTensor(info.name, ggml_type, dims, elements, nbytes, start, array, info)


def open_gguf(path: str | Path) -> LazyGGUFReader:
    """Open a GGUF memory-mapped, turning every way a file can be unreadable into one BpwoptError.

    Readers are reused while the file is unchanged (same inode, size and
    mtime): re-solving one model for many targets in one process opens it
    many times.
    """
    path = Path(path)
    if not path.is_file():
        raise BpwoptError(f"{path}: not a regular file" if path.exists() else f"{path}: no such file")
    status = path.stat()
    return _open_unchanged(path.resolve(), status.st_ino, status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_unchanged(path: Path, inode: int, size: int, mtime_ns: int) -> LazyGGUFReader:
    try:
        return LazyGGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError, OverflowError, TypeError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BpwoptError(f"{path}: not a valid GGUF file, truncated or corrupt ({detail})") from error
