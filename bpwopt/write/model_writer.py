"""The write stage: a quantized GGUF from an input GGUF and one target type per tensor.

Tensors whose target is their source type are copied byte for byte (their
rows checked for NaN and infinity first, as llama.cpp checks them); others
are dequantized slab by slab (the input is memory-mapped) and quantized with
the same kernels measurement uses, with the imatrix of that tensor (one per
expert for 3-D MoE tensors), exactly as llama-quantize does. Metadata is
copied as llama-quantize copies it: split keys dropped, then
general.quantization_version, general.file_type, the overrides, and the
quantize.imatrix.* keys appended, plus bpwopt.* provenance keys. With
--keep-split each tensor goes to the shard its source came from, as
llama_model_quantize does: the first shard carries the metadata, every
shard the split.* keys, and all are published together (`write_gguf_files`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from tqdm import tqdm

from bpwopt.errors import BpwoptError
from bpwopt.formats.gguf_writer import DEFAULT_ALIGNMENT, GGUFLayout, TensorSlot, copied_kv, encode_kv, write_gguf_files
from bpwopt.formats.imatrix import Imatrix
from bpwopt.formats.splits import SPLIT_COUNT, SPLIT_KEYS, SPLIT_NO, SPLIT_TENSORS_COUNT, ModelFiles, split_path
from bpwopt.quant import codec
from bpwopt.quant.types import DEFAULT_ROUNDING, row_bytes
from bpwopt.source.rows import check_copied_rows, expert_count, release_pages, rows_to_float, tensor_rows

GGML_QNT_VERSION = 2
SLAB_BYTES = 64 << 20  # working memory per slab of rows (source + float32 + output)

KeyValue = tuple[GGUFValueType, object]


@dataclass
class WriteRequest:
    """Everything the write stage needs; target_types maps tensor name -> output type, in output order."""

    reader: ModelFiles
    target_types: dict[str, GGMLQuantizationType]
    file_type: int
    # --keep-split: written name -> output shard (from 0); None: one file
    shard_of: dict[str, int] | None = None
    # written name -> source name where they differ (--prune-layers renumbers later blocks)
    source_names: dict[str, str] = field(default_factory=dict)
    imatrix: Imatrix | None = None
    overrides: dict[str, KeyValue] = field(default_factory=dict)  # --override-kv, then imatrix keys
    provenance: dict[str, KeyValue] = field(default_factory=dict)  # bpwopt.* keys
    rounding: str = DEFAULT_ROUNDING  # the quantizers: a name in bpwopt.quant.types.ROUNDINGS
    progress: bool = True


def _converted_pieces(
    tensor: gguf.ReaderTensor, target_type: GGMLQuantizationType, imatrix: Imatrix | None, rounding: str
) -> Iterator[np.ndarray]:
    raw_rows = tensor_rows(tensor)
    n_per_row = int(tensor.shape[0])
    if target_type == tensor.tensor_type:
        rows_per_slab = max(1, SLAB_BYTES // (raw_rows.shape[1] + 4 * n_per_row))  # the bytes and their floats
        for start in range(0, raw_rows.shape[0], rows_per_slab):
            slab = raw_rows[start:start + rows_per_slab]
            check_copied_rows(slab, tensor.tensor_type, tensor.name)
            yield slab
        release_pages(tensor)
        return
    n_expert = expert_count(tensor)
    rows_per_expert = raw_rows.shape[0] // n_expert
    weights = imatrix.weights_for(tensor.name, n_per_row, n_expert) if imatrix else None
    bytes_per_row = raw_rows.shape[1] + 4 * n_per_row + row_bytes(target_type, n_per_row)
    rows_per_slab = max(1, min(rows_per_expert, SLAB_BYTES // bytes_per_row))
    for expert in range(n_expert):
        expert_weights = weights[expert] if weights is not None else None
        for start in range(expert * rows_per_expert, (expert + 1) * rows_per_expert, rows_per_slab):
            stop = min(start + rows_per_slab, (expert + 1) * rows_per_expert)
            floats = rows_to_float(raw_rows[start:stop], tensor.tensor_type, tensor.name)
            try:
                yield codec.quantize(np.ascontiguousarray(floats), target_type, expert_weights, rounding)
            except ValueError as error:
                raise BpwoptError(f"{tensor.name}: cannot quantize to {target_type.name}: {error}") from error
    release_pages(tensor)


def _kv_entries(request: WriteRequest, split_entries: list[bytes]) -> list[bytes]:
    """The first (or only) file's metadata, in llama-quantize's order; the split keys go after the overrides."""
    replaced = {"general.quantization_version", "general.file_type"} | set(request.overrides)
    replaced |= set(request.provenance) | SPLIT_KEYS
    entries = [
        copied_kv(field)
        for name, field in request.reader.fields.items()
        if not name.startswith("GGUF.") and name not in replaced
    ]
    entries.append(encode_kv("general.quantization_version", GGUFValueType.UINT32, GGML_QNT_VERSION))
    entries.append(encode_kv("general.file_type", GGUFValueType.UINT32, request.file_type))
    overrides = {key: value for key, value in request.overrides.items() if key not in request.provenance}
    entries += [encode_kv(key, value_type, value) for key, (value_type, value) in overrides.items()]
    entries += split_entries
    entries += [encode_kv(key, value_type, value) for key, (value_type, value) in request.provenance.items()]
    return entries


def _split_entries(shard: int, shard_count: int, tensor_count: int) -> list[bytes]:
    """The split.* keys of one shard, with llama.cpp's types; none for a model of one file."""
    if shard_count == 1:
        return []
    return [
        encode_kv(SPLIT_NO, GGUFValueType.UINT16, shard),
        encode_kv(SPLIT_COUNT, GGUFValueType.UINT16, shard_count),
        encode_kv(SPLIT_TENSORS_COUNT, GGUFValueType.INT32, tensor_count),
    ]


def output_alignment(reader: gguf.GGUFReader | ModelFiles) -> int:
    """The data alignment the output keeps from the input (general.alignment, else GGUF's 32)."""
    field = reader.fields.get("general.alignment")
    return int(field.contents()) if field is not None else DEFAULT_ALIGNMENT


def _shard_names(request: WriteRequest) -> list[list[str]]:
    """Written names per output file, in output order."""
    if request.shard_of is None:
        return [list(request.target_types)]
    count = max(request.shard_of[name] for name in request.target_types) + 1
    shards: list[list[str]] = [[] for _ in range(count)]
    for name in request.target_types:
        shards[request.shard_of[name]].append(name)
    empty = next((index for index, names in enumerate(shards) if not names), None)
    if empty is not None:  # llama.cpp assumes the shard numbers stay contiguous and crashes
        raise BpwoptError(f"--keep-split: shard {empty + 1} of {count} would hold no tensors once pruned")
    return shards


def _sources(request: WriteRequest) -> dict[str, gguf.ReaderTensor]:
    """Written name -> source tensor (the imatrix keeps the source names, as in llama.cpp)."""
    by_name = {tensor.name: tensor for tensor in request.reader.tensors}
    return {name: by_name[request.source_names.get(name, name)] for name in request.target_types}


def _slot(name: str, source: gguf.ReaderTensor, target_type: GGMLQuantizationType) -> TensorSlot:
    n_per_row = int(source.shape[0])
    nbytes = tensor_rows(source).shape[0] * row_bytes(target_type, n_per_row)
    return TensorSlot(name, tuple(int(n) for n in source.shape), target_type, nbytes)


def _layouts(request: WriteRequest) -> list[GGUFLayout]:
    """Every output file: the first with the metadata and the input's alignment, later shards with
    only their split keys and so GGUF's default alignment."""
    sources, shards = _sources(request), _shard_names(request)
    layouts = []
    for index, names in enumerate(shards):
        split_entries = _split_entries(index, len(shards), len(request.target_types))
        slots = [_slot(name, sources[name], request.target_types[name]) for name in names]
        if index == 0:
            layouts.append(GGUFLayout(_kv_entries(request, split_entries), slots, output_alignment(request.reader)))
        else:
            layouts.append(GGUFLayout(split_entries, slots, DEFAULT_ALIGNMENT))
    return layouts


def output_paths(request: WriteRequest, path: str | Path) -> list[Path]:
    """The files write_model writes for path: path itself, or with --keep-split PATH-00001-of-0000N.gguf …"""
    if request.shard_of is None:
        return [Path(path)]
    count = len(_shard_names(request))
    return [split_path(path, index, count) for index in range(count)]


def planned_file_bytes(request: WriteRequest) -> int:
    """The bytes write_model will write for this request, every shard's header, metadata and padding included."""
    return sum(layout.file_bytes for layout in _layouts(request))


def tensor_alignments(request: WriteRequest) -> dict[str, int]:
    """Written name -> data alignment of the file the tensor is written to (its padding in that file)."""
    return {slot.name: layout.alignment for layout in _layouts(request) for slot in layout.slots}


def write_model(request: WriteRequest, path: str | Path) -> int:
    """Quantize and write every tensor of request.target_types to path (or its shards), atomically.

    Returns the bytes of all files written.
    """
    sources, layouts = _sources(request), _layouts(request)
    total_bytes = sum(slot.nbytes for layout in layouts for slot in layout.slots)

    def produce(file: int, index: int) -> Iterator[np.ndarray]:
        slot = layouts[file].slots[index]
        return _converted_pieces(sources[slot.name], slot.ggml_type, request.imatrix, request.rounding)

    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing", disable=not request.progress) as bar:
        return write_gguf_files(
            output_paths(request, path), layouts, produce, on_tensor_done=lambda slot: bar.update(slot.nbytes)
        )
