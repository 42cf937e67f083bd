"""ggml's own quantizer, reached through ctypes on the libggml-base that llama-cpp-python ships.

This is the oracle the kernels are tested and benchmarked against: it calls
`ggml_quantize_chunk` exactly as llama.cpp's quantize tool does.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType


@functools.cache
def _libggml() -> ctypes.CDLL:
    try:
        import llama_cpp
    except ImportError as error:
        raise RuntimeError("the ggml reference needs llama-cpp-python installed") from error
    library = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not library.exists():
        raise RuntimeError(f"libggml-base.so not found at {library}")
    lib = ctypes.CDLL(str(library))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_quantize(x: np.ndarray, qtype: str | GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 x (nrows, n_per_row) with ggml_quantize_chunk; uint8 (nrows, row_bytes).

    qtype is any ggml type (a name or GGMLQuantizationType), produced by bpwopt or not.
    """
    ggml_type = qtype if isinstance(qtype, GGMLQuantizationType) else GGMLQuantizationType[qtype.upper()]
    lib = _libggml()
    x_rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    nrows, n_per_row = x_rows.shape
    row_bytes = lib.ggml_row_size(int(ggml_type), n_per_row)
    out = np.zeros((nrows, row_bytes), dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = lib.ggml_quantize_chunk(
        int(ggml_type),
        x_rows.ctypes.data,
        out.ctypes.data,
        0,
        nrows,
        n_per_row,
        None if weights is None else weights.ctypes.data,
    )
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


class _TypeTraits(ctypes.Structure):
    """ggml.h's `struct ggml_type_traits`, as far as the decoder."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)),
    ]


@functools.cache
def _type_traits(ggml_type: int) -> _TypeTraits:
    lib = _libggml()
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib.ggml_get_type_traits(ggml_type).contents


def ggml_dequantize(q: np.ndarray, qtype: str | GGMLQuantizationType) -> np.ndarray:
    """Decode uint8 q (nrows, row_bytes) with ggml's own `to_float` of the type; float32 (nrows, n_per_row).

    The decoder's oracle for the types gguf-py does not implement (gguf.quants.dequantize covers the rest).
    """
    ggml_type = qtype if isinstance(qtype, GGMLQuantizationType) else GGMLQuantizationType[qtype.upper()]
    traits = _type_traits(int(ggml_type))
    if not traits.to_float:
        raise RuntimeError(f"ggml has no decoder for {ggml_type.name}")
    q_rows = np.ascontiguousarray(q, dtype=np.uint8).reshape(-1, q.shape[-1])
    nrows, row_bytes = q_rows.shape
    if row_bytes % traits.type_size:
        raise ValueError(f"{row_bytes} bytes is not a whole number of {ggml_type.name} blocks")
    out = np.zeros((nrows, row_bytes // traits.type_size * traits.blck_size), dtype=np.float32)
    traits.to_float(q_rows.ctypes.data, out.ctypes.data, out.size)
    return out
