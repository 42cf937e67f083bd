"""Shared inputs: the demo model and row generators covering the cases ggml special-cases."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest

from bpwopt.demo import smollm2_path

ROW_KINDS = (
    "gaussian",
    "heavy_tailed",
    "outliers",
    "all_zero",
    "constant_positive",
    "constant_negative",
    "tiny",
    "subnormal",
    "huge",
    "mixed_scales",
    "sparse",
)


def make_rows(kind: str, nrows: int, n_per_row: int, seed: int = 0) -> np.ndarray:
    """float32 (nrows, n_per_row) rows of one distribution, deterministic in seed."""
    rng = np.random.default_rng(seed)
    shape = (nrows, n_per_row)
    if kind == "gaussian":
        rows = rng.standard_normal(shape)
    elif kind == "heavy_tailed":
        rows = rng.standard_t(2, shape)
    elif kind == "outliers":
        rows = rng.standard_normal(shape)
        hits = rng.random(shape) < 0.01
        rows[hits] *= 100
    elif kind == "all_zero":
        rows = np.zeros(shape)
    elif kind == "constant_positive":
        rows = np.full(shape, 0.37)
    elif kind == "constant_negative":
        rows = np.full(shape, -1.25)
    elif kind == "tiny":
        rows = rng.standard_normal(shape) * 1e-30
    elif kind == "subnormal":
        rows = rng.standard_normal(shape) * 1e-39
    elif kind == "huge":
        rows = rng.standard_normal(shape) * 1e30
    elif kind == "mixed_scales":
        rows = rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 8, size=(nrows, 1))
    elif kind == "sparse":
        rows = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    else:
        raise ValueError(kind)
    return rows.astype(np.float32)


def save_gguf(writer: gguf.GGUFWriter) -> None:
    """Write out a GGUF built with gguf's writer: header, metadata, tensors, in the order it requires."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_one_block_model(path: Path, rows: int = 8) -> Path:
    """A llama GGUF of one block: an F16 embedding, F32 norms, and two 256-wide weights of `rows` rows."""
    rng = np.random.default_rng(11)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_tensor("token_embd.weight", rng.standard_normal((16, 256)).astype(np.float16))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((rows, 256)).astype(np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((rows, 256)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(256, np.float32))
    save_gguf(writer)
    return path


def make_imatrix(n_per_row: int, seed: int = 1) -> np.ndarray:
    """A random importance matrix with exact zeros and a wide dynamic range."""
    rng = np.random.default_rng(seed)
    weights = rng.exponential(1.0, n_per_row) ** 3
    weights[rng.random(n_per_row) < 0.1] = 0.0
    return weights.astype(np.float32)


@pytest.fixture(scope="session")
def demo_model_path():
    return smollm2_path()


def llama_imatrix_table(entries: dict[str, np.ndarray]) -> tuple[object, list]:
    """llama_model_quantize_params.imatrix for ENTRIES (name -> float32 weights), and what must outlive the call."""
    import llama_cpp  # a test extra: only the tests that compare with llama.cpp import it

    table = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()  # a zeroed entry ends the list
    keep_alive: list = [table]
    for index, (name, values) in enumerate(entries.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        keep_alive.append(data)
        table[index].name, table[index].size = name.encode(), data.size
        table[index].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    return table, keep_alive


# gguf 0.19 has no decoder for these: ggml's own to_float is the oracle.
NO_GGUF_DECODER = {gguf.GGMLQuantizationType.Q1_0, gguf.GGMLQuantizationType.Q2_0}


def reference_dequantize(q: np.ndarray, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 values of q (..., row_bytes) decoded by gguf-py, or by ggml itself where gguf has no decoder."""
    if ggml_type not in NO_GGUF_DECODER:
        return gguf.quants.dequantize(q, ggml_type).astype(np.float32)
    from bpwopt.quant.reference import ggml_dequantize  # needs llama-cpp-python, a test extra

    rows = ggml_dequantize(q.reshape(-1, q.shape[-1]), ggml_type)
    return rows.reshape(*q.shape[:-1], rows.shape[-1])


NO_IMATRIX = np.zeros(0, dtype=np.float32)  # what the row kernels take for ggml's NULL imatrix


def block_bytes(name: str) -> int:
    """Bytes of one block of the ggml type called name."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]


def kernel_quantize(kernels: dict, name: str, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """x (nrows, n_per_row) through the row kernel that a kernel module's KERNELS holds for type name."""
    from bpwopt.quant.kernels.rows import quantize_rows  # appended helper: imports kept beside their use

    ggml_type = gguf.GGMLQuantizationType[name]
    quantize_row, _ = kernels[ggml_type]
    block_size, type_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    out = np.zeros((x.shape[0], x.shape[1] // block_size * type_bytes), dtype=np.uint8)
    quantize_rows(quantize_row, x, NO_IMATRIX if imatrix is None else imatrix, out)
    return out


def kernel_dequantize(kernels: dict, name: str, q: np.ndarray) -> np.ndarray:
    """q (nrows, row_bytes) through the decoder that a kernel module's KERNELS holds for type name."""
    from bpwopt.quant.kernels.rows import dequantize_rows

    ggml_type = gguf.GGMLQuantizationType[name]
    _, dequantize_row = kernels[ggml_type]
    block_size, type_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    out = np.empty((q.shape[0], q.shape[1] // type_bytes * block_size), dtype=np.float32)
    dequantize_rows(dequantize_row, q, out)
    return out


def assert_kernel_same_as_ggml(kernels: dict, name: str, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """The kernel's bytes for x, asserted equal to ggml_quantize_chunk's block for block."""
    from bpwopt.quant.reference import ggml_quantize  # needs llama-cpp-python, a test extra

    ours = kernel_quantize(kernels, name, x, imatrix)
    theirs = ggml_quantize(x, name, imatrix)
    assert ours.shape == theirs.shape
    differing = (ours != theirs).reshape(x.shape[0], -1, block_bytes(name)).any(axis=2)
    assert not differing.any(), f"{name}: {differing.sum()} of {differing.size} blocks differ from ggml"
    return ours


@pytest.fixture(scope="session")
def ffn_down_rows(demo_model_path):
    """The first 64 rows of the demo model's blk.5.ffn_down.weight as float32 (64, 1536): real weights."""
    reader = gguf.GGUFReader(demo_model_path)
    tensor = next(t for t in reader.tensors if t.name == "blk.5.ffn_down.weight")
    rows = gguf.quants.dequantize(tensor.data, tensor.tensor_type)[:64].copy()
    assert rows.shape == (64, 1536)
    return rows.astype(np.float32)
