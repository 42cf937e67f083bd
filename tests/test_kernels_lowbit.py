"""The low-bit kernels (TQ1_0, TQ2_0, Q1_0, Q2_0, MXFP4) against ggml itself.

Bytes are compared with ggml_quantize_chunk from llama-cpp-python's libggml-base. Decoded values are compared
with gguf.quants.dequantize where gguf-py implements the type (TQ1_0, TQ2_0, MXFP4), and with ggml's own
decoder, its `to_float` type trait reached through ctypes, for all five: gguf-py 0.19 has no Q1_0 or Q2_0, so
for those ggml's `dequantize_row_q1_0` and `dequantize_row_q2_0` are the only outside truth. The decoders are also
fed random bytes, which reach codes a quantizer never writes (TQ1_0 bytes above 242·256/243, TQ2_0's and Q2_0's
fourth code, every E8M0 exponent).
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from bpwopt.quant.kernels import binary, fp4, ternary
from bpwopt.quant.kernels.rows import dequantize_rows, quantize_rows
from bpwopt.quant.reference import ggml_dequantize, ggml_quantize
from tests.conftest import ROW_KINDS, make_imatrix, make_rows

KERNELS = {**ternary.KERNELS, **binary.KERNELS, **fp4.KERNELS}
NAMES = ("TQ1_0", "TQ2_0", "Q1_0", "Q2_0", "MXFP4")
GGUF_DECODES = ("TQ1_0", "TQ2_0", "MXFP4")  # gguf-py 0.19 implements no Q1_0 or Q2_0
NO_IMATRIX = np.zeros(0, dtype=np.float32)


def block_size(name: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]


def quantize(x: np.ndarray, name: str, imatrix: np.ndarray | None) -> np.ndarray:
    quantize_row, _ = KERNELS[GGMLQuantizationType[name]]
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    out = np.zeros((x.shape[0], x.shape[1] // block * block_bytes), dtype=np.uint8)
    quantize_rows(quantize_row, np.ascontiguousarray(x), NO_IMATRIX if imatrix is None else imatrix, out)
    return out


def dequantize(q: np.ndarray, name: str) -> np.ndarray:
    _, dequantize_row = KERNELS[GGMLQuantizationType[name]]
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    out = np.zeros((q.shape[0], q.shape[1] // block_bytes * block), dtype=np.float32)
    dequantize_rows(dequantize_row, np.ascontiguousarray(q), out)
    return out


def assert_same_as_ggml(x: np.ndarray, name: str, imatrix: np.ndarray | None) -> np.ndarray:
    ours = quantize(x, name, imatrix)
    theirs = ggml_quantize(x, name, imatrix)
    assert ours.shape == theirs.shape
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]
    differing = (ours != theirs).reshape(ours.shape[0], -1, block_bytes).any(axis=2)
    assert not differing.any(), f"{name}: {differing.sum()} of {differing.size} blocks differ from ggml"
    return ours


def assert_decodes_as_ggml(q: np.ndarray, name: str) -> None:
    ours = dequantize(q, name)
    np.testing.assert_array_equal(ours, ggml_dequantize(q, name))
    if name in GGUF_DECODES:
        with np.errstate(invalid="ignore", over="ignore"):
            theirs = gguf.quants.dequantize(q, GGMLQuantizationType[name])
        np.testing.assert_array_equal(ours, theirs.astype(np.float32))


WIDTHS = [(name, n_per_row) for name in NAMES for n_per_row in sorted({block_size(name), 256, 512})]


@pytest.mark.parametrize(("name", "n_per_row"), WIDTHS)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_bytes_equal_ggml(name, n_per_row, with_imatrix, kind):
    x = make_rows(kind, 6, n_per_row, seed=zlib.crc32(f"{name}{kind}{n_per_row}".encode()) % 1000)
    # All five types ignore the imatrix, as ggml does: the same bytes with one as without.
    assert_same_as_ggml(x, name, make_imatrix(n_per_row) if with_imatrix else None)


def edge_rows(n_per_row: int) -> np.ndarray:
    """Rows that sit on ggml's decision boundaries: ±0, exact halves of the ternary step, exact midpoints
    between MXFP4 levels (multiples of 1/16 next to a block maximum of 1), and the floats right beside them."""
    grid = np.arange(-16, 17, dtype=np.float32) / np.float32(16)
    beside = np.concatenate([np.nextafter(grid, np.float32(-2)), grid, np.nextafter(grid, np.float32(2))])
    values = np.resize(np.concatenate([beside, [-0.0, 0.0, 0.5, -0.5]]).astype(np.float32), (4, n_per_row))
    values[:, 0] = 1.0
    values[1] = -values[1]
    values[2, 0] = -1.0
    values[3] = np.float32(-0.0)
    return values.astype(np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_decision_boundaries_equal_ggml(name):
    assert_same_as_ggml(edge_rows(512), name, None)


@pytest.mark.parametrize("name", ["TQ1_0", "TQ2_0"])
def test_ternary_scale_whose_inverse_overflows(name):
    # With max|x| < 2**-128, 1/max is inf: ggml's lroundf then sees ±inf or NaN, and every trit becomes 1.
    rng = np.random.default_rng(2)
    for amax in (1e-45, 1e-40, 2.5e-39, 2.9e-39, 3e-39):
        x = (rng.uniform(-1, 1, (3, 256)) * amax).astype(np.float32)
        x[:, 0] = np.float32(amax)
        x[:, 1] = 0.0
        assert_same_as_ggml(x, name, None)


def test_mxfp4_exponent_beside_every_power_of_two():
    # floor(log2f(max|x|)) flips at powers of two, and log2f rounds up to the integer just below them;
    # below 2**-125 the exponent goes negative and ggml's cast to uint8 wraps. Every float within 40 ulps
    # of every power of two (subnormals included) is the block maximum of one block.
    bits = np.float32(2.0) ** np.arange(-149, 128, dtype=np.float32)
    near = bits.view(np.int32)[:, None].astype(np.int64) + np.arange(-40, 41)
    amax = np.unique(near[(near > 0) & (near < 0x7F800000)].astype(np.int32).view(np.float32))
    x = np.zeros((amax.size, 32), dtype=np.float32)
    x[:, 3] = amax
    x[:, 7] = -amax * np.float32(0.3)
    x[:, 11] = amax * np.float32(0.77)
    assert_same_as_ggml(x, "MXFP4", None)


@pytest.fixture(scope="module")
def real_rows(demo_model_path):
    """96 rows of SmolLM2 weights per width: attn_q (576 wide) and ffn_down (1536 wide)."""
    reader = gguf.GGUFReader(demo_model_path)
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    rows = {}
    for tensor_name in ("blk.0.attn_q.weight", "blk.5.ffn_down.weight"):
        tensor = by_name[tensor_name]
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)[:96]
        rows[weights.shape[1]] = np.ascontiguousarray(weights, dtype=np.float32)
    return rows


@pytest.mark.parametrize("name", NAMES)
def test_bytes_equal_ggml_on_smollm2_weights(real_rows, name):
    # 576-wide rows where the block divides 576 (MXFP4), the 1536-wide ffn_down rows otherwise.
    x = real_rows[576] if 576 % block_size(name) == 0 else real_rows[1536]
    imatrix = np.abs(np.random.default_rng(7).standard_normal(x.shape[1])).astype(np.float32)
    assert_same_as_ggml(x, name, None)
    assert_same_as_ggml(x, name, imatrix)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "all_zero", "constant_negative", "subnormal", "huge"])
def test_dequantize_equals_ggml_and_gguf(name, kind):
    x = make_rows(kind, 4, 512, seed=3)
    assert_decodes_as_ggml(ggml_quantize(x, name), name)


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_random_bytes_equals_ggml_and_gguf(name):
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]
    row_bytes = 512 // block_size(name) * block_bytes
    q = np.random.default_rng(zlib.crc32(name.encode())).integers(0, 256, (8, row_bytes), dtype=np.uint8)
    assert_decodes_as_ggml(q, name)
