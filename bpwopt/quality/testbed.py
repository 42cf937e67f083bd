"""An off-grid testbed: a float model made from a quantized one, whose weights no longer sit on any grid.

The demo model ships as Q4_1: its weights are exactly Q4_1 grid points, so
any comparison of quantization types on it favours Q4_1 (re-quantizing to it
is nearly lossless). `make_off_grid` dequantizes every quantized tensor and
moves each weight uniformly at random within ±step/2 of its grid point, where
step is the grid spacing of that weight's block in the source (a legacy
block's d, a K-quant sub-block's d·scale), then writes an F16 (or F32) GGUF
with the source's metadata. The noise has the variance of a rounding error
(step²/12): the model stays close to the source, but no type's grid fits it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from bpwopt.errors import BpwoptError
from bpwopt.formats.gguf_reader import open_gguf
from bpwopt.formats.gguf_writer import TensorSlot, copied_kv, encode_kv, write_gguf
from bpwopt.source.rows import rows_to_float, tensor_rows

SLAB_ELEMENTS = 4 << 20  # weights perturbed at a time (float64 work arrays: 32 MiB each)
OUTPUT_FILE_TYPES = {"F16": 1, "F32": 0}  # llama.cpp's LLAMA_FTYPE_MOSTLY_F16, LLAMA_FTYPE_ALL_F32
KEPT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


def _f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """float32 (n_blocks,) from the float16 at byte offset of each block."""
    return blocks[:, offset:offset + 2].copy().view(np.float16).astype(np.float32).ravel()


def _legacy_steps(blocks: np.ndarray) -> np.ndarray:
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: one step d per block of 32, the block's first float16."""
    return _f16_at(blocks, 0)[:, None]


def _q2_k_steps(blocks: np.ndarray) -> np.ndarray:
    """Q2_K: 16 sub-blocks of 16, step d·(scale & 15); d is the float16 at byte 80."""
    return _f16_at(blocks, 80)[:, None] * (blocks[:, :16] & 0x0F).astype(np.float32)


def _q3_k_steps(blocks: np.ndarray) -> np.ndarray:
    """Q3_K: 16 sub-blocks of 16, step |d·(scale − 32)|, 6-bit scales packed in bytes 96..108."""
    scales = blocks[:, 96:108]
    low = (scales[:, None, :8] >> np.array([0, 4], dtype=np.uint8)[None, :, None]).reshape(-1, 16)
    high = (scales[:, None, 8:] >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]).reshape(-1, 16)
    signed = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int8) - np.int8(32)
    return np.abs(_f16_at(blocks, 108)[:, None] * signed.astype(np.float32))


def _q45_k_steps(blocks: np.ndarray) -> np.ndarray:
    """Q4_K, Q5_K: 8 sub-blocks of 32, step d·scale, 6-bit scales packed in bytes 4..16."""
    scales, _ = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    return _f16_at(blocks, 0)[:, None] * scales.astype(np.float32)


def _q6_k_steps(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 16 sub-blocks of 16, step |d·scale|, int8 scales at bytes 192..208, d at byte 208."""
    scales = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    return np.abs(_f16_at(blocks, 208)[:, None] * scales)


# type -> function from its blocks, uint8 (n_blocks, block_bytes), to float32 (n_blocks, sub-blocks) steps
BLOCK_STEPS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLQuantizationType.Q4_0: _legacy_steps,
    GGMLQuantizationType.Q4_1: _legacy_steps,
    GGMLQuantizationType.Q5_0: _legacy_steps,
    GGMLQuantizationType.Q5_1: _legacy_steps,
    GGMLQuantizationType.Q8_0: _legacy_steps,
    GGMLQuantizationType.Q2_K: _q2_k_steps,
    GGMLQuantizationType.Q3_K: _q3_k_steps,
    GGMLQuantizationType.Q4_K: _q45_k_steps,
    GGMLQuantizationType.Q5_K: _q45_k_steps,
    GGMLQuantizationType.Q6_K: _q6_k_steps,
}


def grid_steps(raw_rows: np.ndarray, source_type: GGMLQuantizationType) -> np.ndarray:
    """The grid spacing at every weight of quantized rows: float32 (rows, n_per_row) from uint8 (rows, row_bytes).

    Raises BpwoptError for a type whose grid is not evenly spaced or not handled here.
    """
    _check_handled(source_type)
    step_of = BLOCK_STEPS[source_type]
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[source_type]
    nrows = raw_rows.shape[0]
    steps = step_of(np.ascontiguousarray(raw_rows).reshape(-1, block_bytes))
    per_weight = np.repeat(steps, block_size // steps.shape[1], axis=1)
    return per_weight.reshape(nrows, -1)


def _check_handled(source_type: GGMLQuantizationType, tensor_name: str = "") -> None:
    if source_type not in BLOCK_STEPS and source_type not in KEPT_TYPES:
        handled = ", ".join(t.name for t in BLOCK_STEPS)
        where = f"{tensor_name}: " if tensor_name else ""
        raise BpwoptError(f"{where}cannot place {source_type.name} weights off-grid (handled: {handled})")


def _perturbed_pieces(
    tensor: gguf.ReaderTensor, out_dtype: type, rng: np.random.Generator, spread: float
) -> Iterator[np.ndarray]:
    raw_rows = tensor_rows(tensor)
    rows_per_slab = max(1, SLAB_ELEMENTS // int(tensor.shape[0]))
    for start in range(0, raw_rows.shape[0], rows_per_slab):
        slab = raw_rows[start:start + rows_per_slab]
        weights = rows_to_float(slab, tensor.tensor_type, tensor.name).astype(np.float64)
        noise = (rng.random(weights.shape) - 0.5) * spread * grid_steps(slab, tensor.tensor_type)
        yield (weights + noise).astype(out_dtype)


def _copied_pieces(tensor: gguf.ReaderTensor) -> Iterator[np.ndarray]:
    raw_rows = tensor_rows(tensor)
    rows_per_slab = max(1, (SLAB_ELEMENTS * 4) // raw_rows.shape[1])
    for start in range(0, raw_rows.shape[0], rows_per_slab):
        yield raw_rows[start:start + rows_per_slab]


def tensor_seed(seed: int, name: str) -> list[int]:
    """The noise stream of one tensor: depends on the seed and the tensor's name only."""
    return [seed, zlib.crc32(name.encode("utf-8"))]


def make_off_grid(
    source_path: str | Path, out_path: str | Path, *, seed: int = 0, out_type: str = "F16", spread: float = 1.0
) -> int:
    """Write an off-grid float copy of source_path to out_path, atomically. Returns the file's bytes.

    Quantized tensors become out_type ("F16" or "F32"): dequantized, then each
    weight moved by uniform noise in [-spread·step/2, spread·step/2) of its
    source block (plus the rounding to out_type). spread 1 (the default) leaves
    no trace of the grid: a block's weights are spread uniformly over its range;
    a smaller spread keeps the model closer to the source but partly on-grid.
    F32/F16/BF16 tensors (norms, 1-D) are copied as they are. Metadata is kept,
    general.file_type set (1 for F16, 0 for F32), bpwopt.testbed.* keys added.
    Raises BpwoptError for an unhandled source type or a bad argument.
    """
    if out_type not in OUTPUT_FILE_TYPES:
        raise BpwoptError(f"out_type must be F16 or F32, got {out_type}")
    if seed < 0:
        raise BpwoptError(f"seed must be non-negative, got {seed}")
    if not 0 < spread <= 1:
        raise BpwoptError(f"spread must be in (0, 1], got {spread}")
    reader = open_gguf(source_path)
    target_type = GGMLQuantizationType[out_type]
    out_dtype = np.float16 if out_type == "F16" else np.float32
    for tensor in reader.tensors:
        _check_handled(tensor.tensor_type, tensor.name)
    slots = [_slot(tensor, target_type) for tensor in reader.tensors]

    def produce(index: int) -> Iterator[np.ndarray]:
        tensor = reader.tensors[index]
        if tensor.tensor_type in KEPT_TYPES:
            return _copied_pieces(tensor)
        return _perturbed_pieces(tensor, out_dtype, np.random.default_rng(tensor_seed(seed, tensor.name)), spread)

    alignment_field = reader.fields.get("general.alignment")
    return write_gguf(
        out_path,
        _kv_entries(reader, OUTPUT_FILE_TYPES[out_type], Path(source_path).name, seed, spread),
        slots,
        produce,
        alignment=int(alignment_field.contents()) if alignment_field else gguf.GGUF_DEFAULT_ALIGNMENT,
    )


def _slot(tensor: gguf.ReaderTensor, target_type: GGMLQuantizationType) -> TensorSlot:
    shape = tuple(int(n) for n in tensor.shape)
    if tensor.tensor_type in KEPT_TYPES:
        return TensorSlot(tensor.name, shape, tensor.tensor_type, int(tensor.n_bytes))
    element_bytes = 2 if target_type == GGMLQuantizationType.F16 else 4
    return TensorSlot(tensor.name, shape, target_type, int(tensor.n_elements) * element_bytes)


def _kv_entries(reader: gguf.GGUFReader, file_type: int, source_name: str, seed: int, spread: float) -> list[bytes]:
    entries = [
        copied_kv(field)
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.") and name != "general.file_type" and not name.startswith("bpwopt.testbed.")
    ]
    entries.append(encode_kv("general.file_type", GGUFValueType.UINT32, file_type))
    entries.append(encode_kv("bpwopt.testbed.source", GGUFValueType.STRING, source_name))
    entries.append(encode_kv("bpwopt.testbed.seed", GGUFValueType.UINT64, seed))
    entries.append(encode_kv("bpwopt.testbed.spread", GGUFValueType.FLOAT32, spread))
    return entries
