"""Importance matrices: the files llama-imatrix writes, read as llama-quantize reads them.

Two formats: the GGUF one (tensors `<name>.in_sum2` and `<name>.counts`, one
count per expert; the weight is in_sum2 / count, 1 where a count is 0) and the
legacy `.dat` (entries of Σ/ncall, the weight being that divided by ncall).
Every count and length in a file is checked against the file's size before
anything is allocated from it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np

from bpwopt.errors import BpwoptError
from bpwopt.formats.files import file_sha256
from bpwopt.formats.gguf_reader import LazyGGUFReader

_SUM_SUFFIX = ".in_sum2"
_COUNT_SUFFIX = ".counts"


@dataclass(frozen=True)
class Imatrix:
    """Per-tensor column weights (float32, length n_per_row × n_expert) and provenance."""

    path: Path
    entries: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    sha256: str = ""

    def weights_for(self, tensor_name: str, n_per_row: int, n_expert: int = 1) -> np.ndarray | None:
        """The weights of one tensor, shape (n_expert, n_per_row), or None when the file has none.

        A size that does not fit the tensor is an error (llama.cpp aborts too),
        except for the token embedding, which llama.cpp then quantizes without.
        """
        weights = self.entries.get(tensor_name)
        if weights is None:
            return None
        if weights.size != n_per_row * n_expert:
            if tensor_name.startswith("token_embd."):
                return None
            raise BpwoptError(
                f"{self.path}: imatrix entry {tensor_name} has {weights.size} values, the tensor needs "
                f"{n_per_row * n_expert}; is this imatrix for another model?"
            )
        return weights.reshape(n_expert, n_per_row)

    def filtered(self, include: list[str], exclude: list[str]) -> Imatrix:
        """llama-quantize's --include-weights / --exclude-weights: substring matches on entry names."""
        entries = {
            name: weights
            for name, weights in self.entries.items()
            if not any(part in name for part in exclude)
            and (not include or any(part in name for part in include))
        }
        return replace(self, entries=entries)


def _load_gguf_imatrix(path: Path, reader: gguf.GGUFReader) -> Imatrix:
    sums, sum_rows, counts = {}, {}, {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise BpwoptError(f"{path}: imatrix tensor {tensor.name} is {tensor.tensor_type.name}, not F32")
        if tensor.name.endswith(_SUM_SUFFIX):
            name = tensor.name.removesuffix(_SUM_SUFFIX)
            sums[name] = np.asarray(tensor.data, dtype=np.float32).ravel()
            sum_rows[name] = sums[name].size // max(1, int(tensor.shape[0]))  # one row of sums per expert
        elif tensor.name.endswith(_COUNT_SUFFIX):
            counts[tensor.name.removesuffix(_COUNT_SUFFIX)] = np.asarray(tensor.data, dtype=np.float32).ravel()
    if not sums:
        raise BpwoptError(f"{path}: no imatrix data in this GGUF file")
    if sums.keys() != counts.keys():
        unmatched = sorted(sums.keys() ^ counts.keys())[0]
        raise BpwoptError(f"{path}: imatrix sums and counts do not pair up (first: {unmatched})")
    entries = {}
    for name, in_sum2 in sums.items():
        if not (np.isfinite(counts[name]).all() and (counts[name] >= 0).all()):
            raise BpwoptError(f"{path}: imatrix entry {name} has a negative or non-finite count")
        expert_counts = np.rint(counts[name]).astype(np.float32)
        if expert_counts.size != sum_rows[name] or in_sum2.size % expert_counts.size:
            raise BpwoptError(
                f"{path}: imatrix entry {name} has {expert_counts.size} counts for {sum_rows[name]} rows of sums"
            )
        per_expert = in_sum2.reshape(expert_counts.size, -1)
        safe_counts = np.where(expert_counts > 0, expert_counts, 1)[:, None]
        weights = np.where(expert_counts[:, None] > 0, per_expert / safe_counts, np.float32(1))
        entries[name] = weights.astype(np.float32).ravel()
    datasets_field = reader.fields.get("imatrix.datasets")
    chunks_field = reader.fields.get("imatrix.chunk_count")
    if datasets_field is None or chunks_field is None or "imatrix.chunk_size" not in reader.fields:
        raise BpwoptError(f"{path}: missing imatrix metadata (imatrix.datasets, chunk_count, chunk_size)")
    return Imatrix(
        path=path,
        entries=entries,
        datasets=[str(value) for value in datasets_field.contents()],
        chunk_count=int(chunks_field.contents()),
    )


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.offset, self.path = data, 0, path

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, size: int) -> bytes:
        if size < 0 or size > self.remaining():
            raise BpwoptError(f"{self.path}: truncated or corrupt legacy imatrix at byte {self.offset}")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def int32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]


def _load_legacy_imatrix(path: Path) -> Imatrix:
    cursor = _Cursor(path.read_bytes(), path)
    n_entries = cursor.int32()
    if n_entries < 1 or n_entries > cursor.remaining() // 16:
        raise BpwoptError(f"{path}: neither a GGUF imatrix nor a legacy one ({n_entries} entries)")
    entries = {}
    for _ in range(n_entries):
        name = cursor.take(cursor.int32()).split(b"\0")[0].decode("utf-8", "replace")
        ncall = cursor.int32()
        nval = cursor.int32()
        if ncall < 0:
            raise BpwoptError(f"{path}: imatrix entry {name} was collected {ncall} times")
        if nval < 1:
            raise BpwoptError(f"{path}: imatrix entry {name} has {nval} values")
        sums = np.frombuffer(cursor.take(4 * nval), dtype="<f4").astype(np.float32)
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums
    chunk_count, datasets = 0, []
    if cursor.remaining() >= 4:
        chunk_count = cursor.int32()
        if cursor.remaining() >= 4:
            length = cursor.int32()
            if 0 < length <= cursor.remaining():
                datasets.append(cursor.take(length).decode("utf-8", "replace"))
    return Imatrix(path=path, entries=entries, datasets=datasets, chunk_count=chunk_count)


def load_imatrix(path: str | Path) -> Imatrix:
    """Read an imatrix file of either format; non-finite values are refused as llama.cpp refuses them."""
    path = Path(path)
    if not path.is_file():
        raise BpwoptError(f"{path}: no such imatrix file")
    with path.open("rb") as handle:
        is_gguf = handle.read(4) == b"GGUF"
    if is_gguf:
        try:
            reader = LazyGGUFReader(path)
        except (ValueError, KeyError, IndexError, OSError, OverflowError, TypeError) as error:
            raise BpwoptError(f"{path}: not a valid GGUF imatrix ({error})") from error
        imatrix = _load_gguf_imatrix(path, reader)
    else:
        imatrix = _load_legacy_imatrix(path)
    for name, weights in imatrix.entries.items():
        if not np.isfinite(weights).all():
            raise BpwoptError(f"{path}: imatrix entry {name} contains non-finite values")
        if (weights < 0).any():  # sums of squared activations: a negative one is a damaged file
            raise BpwoptError(f"{path}: imatrix entry {name} contains negative values")
    return replace(imatrix, sha256=file_sha256(path))


def check_imatrix_fits(imatrix: Imatrix, tensor_names: set[str]) -> None:
    """Refuse an imatrix none of whose entries name a tensor of the model: it is for another model."""
    if imatrix.entries and not set(imatrix.entries) & tensor_names:
        example = next(iter(imatrix.entries))
        raise BpwoptError(
            f"{imatrix.path}: no imatrix entry matches a tensor of this model (e.g. {example}); "
            "is it for another model?"
        )
