"""Every kernel against ggml itself: bytes from ggml_quantize_chunk, values from gguf.quants.dequantize.

The oracle is libggml-base from llama-cpp-python (built with GGML_NATIVE=OFF),
called through ctypes exactly as llama-quantize calls it.
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest

import bpwopt
from bpwopt.quant.reference import ggml_quantize
from bpwopt.quant.types import QUANT_TYPES, REQUIRES_IMATRIX, get_quant_type
from tests.conftest import ROW_KINDS, make_imatrix, make_rows, reference_dequantize

REQUIRED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4", "Q1_0", "Q2_0", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
)  # fmt: skip
# ggml's grid searches assert on rows near 1e30 (every weighted error overflows) and abort the process: no oracle.
GGML_ABORTS = {("huge", name) for name in ("IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S")}
# ggml aborts quantizing these without an imatrix: they are compared with one only.
WEIGHTED_ONLY = {name for name in REQUIRED_TYPES if gguf.GGMLQuantizationType[name] in REQUIRES_IMATRIX}

# SmolLM2's width 576 is not a multiple of 256: only ffn_down rows (1536) take K-quants.
REAL_TENSORS = {"blk.0.attn_q.weight": 576, "blk.5.ffn_down.weight": 1536, "blk.29.attn_v.weight": 576}
REAL_CASES = [
    (name, tensor_name)
    for name in REQUIRED_TYPES
    for tensor_name, n_per_row in REAL_TENSORS.items()
    if n_per_row % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0] == 0
]


def differing_blocks(ours: np.ndarray, theirs: np.ndarray, block_bytes: int) -> int:
    mismatch = (ours != theirs).reshape(ours.shape[0], -1, block_bytes).any(axis=2)
    return int(mismatch.sum())


def assert_same_as_ggml(x: np.ndarray, name: str, imatrix: np.ndarray | None) -> np.ndarray:
    quant_type = get_quant_type(name)
    ours = bpwopt.quantize(x, name, imatrix)
    theirs = ggml_quantize(x, name, imatrix)
    assert ours.shape == theirs.shape
    n_diff = differing_blocks(ours, theirs, quant_type.block_bytes)
    n_blocks = x.size // quant_type.block_size
    assert n_diff == 0, f"{name}: {n_diff} of {n_blocks} blocks differ from ggml"
    return ours


def test_registry_holds_every_required_type():
    assert sorted(REQUIRED_TYPES) == sorted(t.name for t in QUANT_TYPES.values())


@pytest.mark.parametrize(
    ("name", "with_imatrix", "kind"),
    [
        pytest.param(name, weighted, kind, id=f"{name}-{'imatrix' if weighted else 'plain'}-{kind}")
        for name in REQUIRED_TYPES
        for weighted in (False, True)
        for kind in ROW_KINDS
        if (weighted or name not in WEIGHTED_ONLY) and (kind, name) not in GGML_ABORTS
    ],
)
def test_bytes_equal_ggml(name, with_imatrix, kind):
    n_per_row = 512
    x = make_rows(kind, 6, n_per_row, seed=zlib.crc32(f"{name}{kind}".encode()) % 1000)
    imatrix = make_imatrix(n_per_row) if with_imatrix else None
    assert_same_as_ggml(x, name, imatrix)


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_iq4_levels_at_their_ties_and_ends_equal_ggml(name, with_imatrix):
    """Blocks whose extreme is the lowest level, so the first scale maps x onto the levels as is:
    every element sits on a level, halfway between two (a tie) or beyond the ends."""
    levels = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
    values = np.concatenate([levels, (levels[:-1] + levels[1:]) / 2, [-126.5, 112.5, 113, 120], levels + 0.25])
    rng = np.random.default_rng(7)
    x = rng.choice(values, size=(8, 512)).astype(np.float32)
    x[:, ::32] = -127  # every block's extreme is −127 itself (values stay within ±127)
    imatrix = make_imatrix(512) if with_imatrix else None
    assert_same_as_ggml(x, name, imatrix)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"])
@pytest.mark.parametrize("n_per_row", [32, 576])
def test_block32_types_on_rows_that_are_not_a_multiple_of_256(name, n_per_row):
    x = make_rows("gaussian", 5, n_per_row, seed=n_per_row)
    assert_same_as_ggml(x, name, None)
    assert_same_as_ggml(x, name, make_imatrix(n_per_row))


@pytest.fixture(scope="module")
def real_tensors(demo_model_path):
    reader = gguf.GGUFReader(demo_model_path)
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    return {
        name: gguf.quants.dequantize(by_name[name].data, by_name[name].tensor_type)[:96].copy() for name in REAL_TENSORS
    }


@pytest.mark.parametrize(("name", "tensor_name"), REAL_CASES)
def test_bytes_equal_ggml_on_smollm2_weights(real_tensors, name, tensor_name):
    x = real_tensors[tensor_name]
    n_per_row = REAL_TENSORS[tensor_name]
    assert x.shape[1] == n_per_row
    if name not in WEIGHTED_ONLY:
        assert_same_as_ggml(x, name, None)
    imatrix = np.abs(np.random.default_rng(7).standard_normal(n_per_row)).astype(np.float32)
    assert_same_as_ggml(x, name, imatrix)


@pytest.mark.parametrize("name", REQUIRED_TYPES)
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "all_zero", "subnormal", "huge"])
def test_dequantize_equals_gguf(name, kind):
    x = make_rows(kind, 4, 256, seed=3)
    q = bpwopt.quantize(x, name, make_imatrix(256))
    ours = bpwopt.dequantize(q, name)
    np.testing.assert_array_equal(ours, reference_dequantize(q, get_quant_type(name).ggml_type))


def _rows_whose_moved_mins_overflow(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes over six decades, half the rows negative, importances mostly exactly zero."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((32, 512)) * 10.0 ** rng.integers(-3, 4, (32, 512))
    x[1::2] = -np.abs(x[1::2])
    imatrix = np.where(rng.random(512) < 0.6, 0.0, rng.random(512) * 10.0 ** rng.integers(-3, 4, 512))
    return x.astype(np.float32), imatrix.astype(np.float32)


def test_grouped_affine_search_meets_rows_it_cannot_round_exactly():
    """The rows below move some block's min so far that iscale·(x − min) passes 2**22, where ggml's
    integer rounding wraps and the float rounding of the grouped search would not: it must say so."""
    from bpwopt.quant.kernels import scale_search

    x, imatrix = _rows_whose_moved_mins_overflow()
    inexact = 0
    for row in x:
        weights = (imatrix * np.sqrt(np.float32(np.mean(row * row)) + row * row)).astype(np.float32)
        values, weights = (np.ascontiguousarray(a.reshape(16, 32).T) for a in (row, weights))
        scratch = [np.empty_like(values), np.empty(16, np.float32), np.empty(16, np.float32), np.empty_like(values)]
        lanes = np.empty((scale_search._GROUP_ROWS, 16), np.float32)
        inexact += not scale_search._affine_quants_groups(
            15, values, weights, *scratch, lanes, np.float32(-0.9), np.float32(0.05), 36, False, True
        )
    assert inexact > 0


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K", "Q4_1", "Q5_1"])
def test_affine_searches_equal_ggml_where_a_moved_min_overflows_the_rounding(name):
    """Those rows fall back to the one-block search, so the bytes stay ggml's."""
    x, imatrix = _rows_whose_moved_mins_overflow()
    assert_same_as_ggml(x, name, imatrix)
