"""A tensor's rows as the stages read them: raw bytes from the memory map, float32 on demand.

Measurement, the write stage and the quality tools all read tensors through
these functions, so that the rows of a 3-D (MoE) tensor, the check against a
file that shrank, and the float32 conversion are decided in one place. The
float32 rows of an F32 tensor are a read-only view of the input file: callers
that change values must copy them first.
"""

from __future__ import annotations

import mmap

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from bpwopt.errors import BpwoptError
from bpwopt.quant import codec
from bpwopt.quant.types import QUANT_TYPES

_FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})


def tensor_rows(tensor: gguf.ReaderTensor) -> np.ndarray:
    """The raw bytes of a tensor as uint8 (rows, row_bytes), a view into the memory map."""
    _check_input_whole(tensor)
    n_per_row = int(tensor.shape[0])
    nrows = int(tensor.n_elements) // n_per_row
    return np.asarray(tensor.data).reshape(-1).view(np.uint8).reshape(nrows, -1)


def release_pages(tensor: gguf.ReaderTensor) -> None:
    """Let go of the tensor's pages of the input's memory map once it has been read.

    Pages read through a map stay in the process's resident set until the
    kernel wants them back, so reading a model tensor by tensor would show the
    whole file in RSS. A tensor is read once per stage; dropping its pages
    bounds the resident set by the tensor at hand. They stay in the page
    cache: touching them again costs a fault, not a disk read.
    """
    mapping = getattr(tensor.data, "_mmap", None)
    if mapping is None or mapping.closed or not hasattr(mmap, "MADV_DONTNEED"):  # no madvise on Windows
        return
    start = tensor.data_offset - tensor.data_offset % mmap.PAGESIZE
    end = min(tensor.data_offset + int(tensor.n_bytes), mapping.size())
    if end > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def _check_input_whole(tensor: gguf.ReaderTensor) -> None:
    """Refuse a tensor whose bytes are no longer in the file: touching them would kill the process (SIGBUS).

    A file truncated while bpwopt reads it can still hit that between this
    check and the read; the output is then never renamed into place.
    """
    mapping = getattr(tensor.data, "_mmap", None)  # np.memmap's; its size() is the file's, even once deleted
    if mapping is None:
        return
    end = tensor.data_offset + int(tensor.n_bytes)
    size = mapping.size()
    if size < end:
        path = tensor.data.filename
        raise BpwoptError(f"{path}: the file shrank to {size:,} bytes while being read ({tensor.name} ends at {end:,})")


def rows_to_float(raw_rows: np.ndarray, source_type: GGMLQuantizationType, name: str) -> np.ndarray:
    """Rows of any ggml type as float32: our kernels where we have them, gguf's otherwise.

    Always a new array the caller owns, F32 included: the input is memory-mapped
    read-only, and a caller that changes the values (calibrate adds noise) must
    never write into it. Rows holding a NaN or an infinity are refused with the
    tensor's name (`check_finite`).
    """
    if source_type == GGMLQuantizationType.F32:
        values = raw_rows.view(np.float32).copy()
    elif source_type in QUANT_TYPES:
        values = codec.dequantize(np.ascontiguousarray(raw_rows), source_type)
    else:
        try:
            values = gguf.quants.dequantize(raw_rows, source_type).astype(np.float32)
        except NotImplementedError:  # integer tensors (I8 … I64): llama-quantize cannot requantize them either
            raise BpwoptError(f"cannot convert {source_type.name} tensor data to another type") from None
    return check_finite(values, name)


def check_finite(values: np.ndarray, name: str) -> np.ndarray:
    """values, unless one is NaN or infinite: then the one-line error llama-quantize stops with.

    llama.cpp validates every row it loads for quantizing ("tensor '…' has
    invalid data"); quantized, such a row would give NaN scales or garbage
    blocks in a file that loads and then produces nothing useful.
    """
    if not codec.all_finite(values):
        raise invalid_data(name)
    return values


def invalid_data(name: str) -> BpwoptError:
    """The one-line error for a tensor holding NaN or infinite values, wherever they are found."""
    return BpwoptError(f"tensor '{name}' has invalid data: NaN or infinite values (llama.cpp refuses it too)")


def check_copied_rows(raw_rows: np.ndarray, source_type: GGMLQuantizationType, name: str) -> None:
    """The same validation for rows copied byte for byte, for the types bpwopt can decode.

    Integer tensors hold no floats; the i-quants bpwopt has no kernel for are
    copied unchecked (decoding them in numpy would cost more than the copy).
    """
    if source_type in _FLOAT_TYPES or source_type in QUANT_TYPES:
        rows_to_float(raw_rows, source_type, name)


def expert_count(tensor: gguf.ReaderTensor) -> int:
    """Experts of a 3-D (MoE) tensor: the product of its dimensions after the first two; 1 for a matrix."""
    return int(np.prod([int(n) for n in tensor.shape[2:]], dtype=np.int64)) if len(tensor.shape) > 2 else 1
