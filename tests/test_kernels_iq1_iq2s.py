"""IQ1_S, IQ1_M and IQ2_S against ggml: bytes from ggml_quantize_chunk, values from gguf-py's decoders.

ggml requires an imatrix for IQ1_S (it aborts the process without one, so the oracle is never called
that way); IQ1_M and IQ2_S take rows with and without one. The 1-bit searches sort each block's values,
and ggml's qsort comparator calls equal values equal: rows with many ties (constant rows, rows of a few
distinct values) check that ties are ordered as glibc's qsort orders them.
"""

from __future__ import annotations

from functools import partial

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from bpwopt.quant.kernels import iq1, iq2s
from bpwopt.quant.kernels.numerics import fp16_bits_to_fp32
from tests.conftest import (
    NO_IMATRIX,
    ROW_KINDS,
    assert_kernel_same_as_ggml,
    block_bytes,
    kernel_dequantize,
    kernel_quantize,
    make_imatrix,
    make_rows,
)

KERNELS = {**iq1.KERNELS, **iq2s.KERNELS}
TYPES = ("IQ1_S", "IQ1_M", "IQ2_S")
# (type, with an imatrix): every case ggml itself accepts.
CASES = [("IQ1_S", True), ("IQ1_M", False), ("IQ1_M", True), ("IQ2_S", False), ("IQ2_S", True)]
CASE_IDS = [f"{name}-{'imatrix' if with_imatrix else 'plain'}" for name, with_imatrix in CASES]


quantize = partial(kernel_quantize, KERNELS)
dequantize = partial(kernel_dequantize, KERNELS)
assert_same_as_ggml = partial(assert_kernel_same_as_ggml, KERNELS)


def imatrix_for(with_imatrix: bool, n_per_row: int, seed: int = 1) -> np.ndarray | None:
    return make_imatrix(n_per_row, seed=seed) if with_imatrix else None


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize(("name", "with_imatrix"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kind", [kind for kind in ROW_KINDS if kind != "huge"])
def test_bytes_equal_ggml(name, with_imatrix, kind):
    x = make_rows(kind, 6, 512, seed=len(kind) + 7 * len(name))
    assert_same_as_ggml(name, x, imatrix_for(with_imatrix, 512))


@pytest.mark.parametrize(("name", "with_imatrix"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("n_per_row", [256, 512, 1536])
def test_row_widths(name, with_imatrix, n_per_row):
    x = make_rows("gaussian", 8, n_per_row, seed=n_per_row)
    assert_same_as_ggml(name, x, imatrix_for(with_imatrix, n_per_row, seed=n_per_row))


@pytest.mark.parametrize(("name", "with_imatrix"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("magnitude", [1e-20, 1e-8, 1e-4, 1e4, 1e10])
def test_small_and_large_magnitudes(name, with_imatrix, magnitude):
    # Beyond this IQ2_S's neighbour search overflows and ggml aborts (see test_huge_rows).
    x = (make_rows("heavy_tailed", 6, 512, seed=3) * np.float32(magnitude)).astype(np.float32)
    assert_same_as_ggml(name, x, imatrix_for(with_imatrix, 512))


@pytest.mark.parametrize(("name", "with_imatrix"), CASES, ids=CASE_IDS)
def test_rows_with_many_ties(name, with_imatrix):
    """Values from a few levels, so every block sorts many equal values (and +0 beside −0); with an
    imatrix the tied elements weigh differently, and their order changes the prefix sums."""
    rng = np.random.default_rng(17)
    x = rng.choice(np.array([-1.5, -0.5, -0.0, 0.0, 0.25, 0.5, 2.0], dtype=np.float32), size=(8, 512))
    x[0] = 0.5
    x[1, ::2] = -0.5
    x[1, 1::2] = 0.5
    assert_same_as_ggml(name, x, imatrix_for(with_imatrix, 512, seed=4))


@pytest.mark.parametrize(("name", "with_imatrix"), CASES, ids=CASE_IDS)
def test_blocks_without_signal(name, with_imatrix):
    """All-zero and below-threshold blocks among coded ones, and blocks whose imatrix is all zero."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[0, 0:32] = 0
    x[1, 64:80] = 0
    x[1, 160:192] = 0
    x[2, 224:256] = 1e-9  # below IQ1_M's and IQ2_S's thresholds, above IQ1_S's
    x[3, :256] = 0  # a whole zero super-block before a coded one
    x[4, 32:256] = 0  # only the first block coded
    x[5, 0:240] = 0  # only the last block of 16 coded
    x[6, 100] = 1e-3  # one element in an otherwise zero block
    x[6, 96:100] = 0
    x[6, 101:128] = 0
    imatrix = make_imatrix(512)
    imatrix[96:128] = 0
    imatrix[288:320] = 0
    assert_same_as_ggml(name, x, imatrix if with_imatrix else None)


def test_huge_rows():
    """At |x| ~ 1e30 the float32 sums overflow. The 1-bit searches then find no split with a finite
    positive Σw·q², and ggml and the kernels code the same bytes; IQ2_S's neighbour search finds no finite
    error and ggml aborts on GGML_ASSERT(grid_index >= 0) (not called here), while the kernel takes the
    nearest neighbour and returns a block whose fp16 scale is not finite."""
    x = make_rows("huge", 3, 512, seed=2)
    assert_same_as_ggml("IQ1_S", x, make_imatrix(512))
    assert_same_as_ggml("IQ1_M", x, None)
    assert_same_as_ggml("IQ1_M", x, make_imatrix(512))
    for imatrix in (None, make_imatrix(512)):
        q = quantize("IQ2_S", x, imatrix)
        d = fp16_bits_to_fp32(q.reshape(-1, block_bytes("IQ2_S"))[:, :2].copy().view(np.uint16))
        assert not np.isfinite(d).any()


def test_iq1_s_refuses_rows_without_an_imatrix():
    x = make_rows("gaussian", 2, 256)
    quantize_row, _ = KERNELS[GGMLQuantizationType.IQ1_S]
    with pytest.raises(ValueError, match="importance matrix"):
        quantize_row(x[0], NO_IMATRIX, np.zeros(block_bytes("IQ1_S"), dtype=np.uint8))
    # Through the parallel driver the error surfaces as a SystemError whose cause is that ValueError.
    with pytest.raises(SystemError) as raised:
        quantize("IQ1_S", x, None)
    assert isinstance(raised.value.__cause__, ValueError)


@pytest.mark.parametrize(("name", "with_imatrix"), CASES, ids=CASE_IDS)
def test_bytes_equal_ggml_on_smollm2_ffn_down(ffn_down_rows, name, with_imatrix):
    imatrix = np.abs(np.random.default_rng(7).standard_normal(1536)).astype(np.float32)
    assert_same_as_ggml(name, ffn_down_rows, imatrix if with_imatrix else None)


# ---------------------------------------------------------------- dequantization


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "sparse", "all_zero", "subnormal", "constant_negative"])
def test_dequantize_equals_gguf(name, kind):
    x = make_rows(kind, 4, 512, seed=11)
    q = quantize(name, x, make_imatrix(512))
    np.testing.assert_array_equal(dequantize(name, q), gguf.quants.dequantize(q, GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_random_blocks_equals_gguf(name):
    """Every grid index, shift bit and multiplier, not only those the quantizer emits; the fp16 scales
    are kept finite (IQ1_M spreads its scale over the top nibbles of the four scale words)."""
    rng = np.random.default_rng(13)
    blocks = rng.integers(0, 256, size=(64, block_bytes(name)), dtype=np.uint8)
    d_bits = np.float16(rng.uniform(-2, 2, size=64)).view(np.uint16).astype(np.int64)
    if name == "IQ1_M":
        words = blocks[:, 48:56].copy().view("<u2").astype(np.int64) & 0x0FFF
        for word in range(4):
            words[:, word] |= ((d_bits >> (4 * word)) & 0xF) << 12
        blocks[:, 48:56] = words.astype("<u2").view(np.uint8)
    else:
        blocks[:, :2] = d_bits.astype("<u2").view(np.uint8).reshape(64, 2)
    q = blocks.reshape(8, -1)
    np.testing.assert_array_equal(dequantize(name, q), gguf.quants.dequantize(q, GGMLQuantizationType[name]))
