"""The public API: shapes, round trips, the fused error kernel and argument checking."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bpwopt
from bpwopt.quant.codec import all_finite
from bpwopt.quant.types import QUANT_TYPES
from tests.conftest import make_imatrix, make_rows, reference_dequantize


@st.composite
def tensors(draw):
    """A float32 tensor of 1 to 3 dims whose rows fill whole blocks of a drawn type."""
    quant_type = draw(st.sampled_from(list(QUANT_TYPES.values())))
    blocks = draw(st.integers(1, 3 if quant_type.block_size == 256 else 12))
    n_per_row = blocks * max(quant_type.block_size, 32)
    leading = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    elements = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
    x = draw(hnp.arrays(np.float32, (*leading, n_per_row), elements=elements))
    return quant_type, x


@settings(max_examples=150, deadline=None)
@given(tensors(), st.booleans())
def test_round_trip_keeps_shape_and_matches_gguf(case, with_imatrix):
    quant_type, x = case
    imatrix = make_imatrix(x.shape[-1]) if with_imatrix or quant_type.requires_imatrix else None
    q = bpwopt.quantize(x, quant_type.name, imatrix)
    assert q.dtype == np.uint8
    assert q.shape == (*x.shape[:-1], quant_type.row_bytes(x.shape[-1]))
    y = bpwopt.dequantize(q, quant_type.ggml_type)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y, reference_dequantize(q, quant_type.ggml_type))


@settings(max_examples=100, deadline=None)
@given(tensors(), st.booleans())
def test_quant_error_equals_error_of_the_round_trip(case, with_imatrix):
    quant_type, x = case
    imatrix = make_imatrix(x.shape[-1]) if with_imatrix or quant_type.requires_imatrix else None
    y = bpwopt.dequantize(bpwopt.quantize(x, quant_type.name, imatrix), quant_type.name)
    squared = (x.astype(np.float64) - y.astype(np.float64)) ** 2
    weights = imatrix if imatrix is not None and quant_type.block_size > 1 else 1.0
    weighted_sse, sse = bpwopt.quant_error(x, quant_type.name, imatrix)
    assert sse == pytest.approx(squared.sum(), rel=1e-9, abs=1e-30)
    assert weighted_sse == pytest.approx((squared * weights).sum(), rel=1e-9, abs=1e-30)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q8_0"])
def test_requantizing_quantized_values_is_exact(name):
    """Values already on a type's grid survive another trip through it."""
    x = make_rows("gaussian", 4, 256)
    once = bpwopt.dequantize(bpwopt.quantize(x, name), name)
    np.testing.assert_array_equal(bpwopt.dequantize(bpwopt.quantize(once, name), name), once)


def test_f32_round_trip_is_the_identity():
    x = make_rows("mixed_scales", 3, 64)
    assert bpwopt.quant_error(x, "F32") == (0.0, 0.0)


@pytest.mark.parametrize("qtype", ["q4_k", 12, gguf.GGMLQuantizationType.Q4_K, " Q4_K "])
def test_type_is_accepted_as_name_integer_or_enum(qtype):
    x = make_rows("gaussian", 2, 256)
    np.testing.assert_array_equal(bpwopt.quantize(x, qtype), bpwopt.quantize(x, "Q4_K"))


def test_more_bits_give_less_error_on_gaussian_weights():
    x = make_rows("gaussian", 64, 512)
    errors = [bpwopt.quant_error(x, name)[1] for name in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]]
    assert errors == sorted(errors, reverse=True)


def test_imatrix_lowers_the_weighted_error_it_is_asked_to_minimize():
    x = make_rows("gaussian", 64, 512)
    imatrix = make_imatrix(512)
    weighted_with, _ = bpwopt.quant_error(x, "Q4_K", imatrix)
    plain_q = bpwopt.quantize(x, "Q4_K")
    residual = (x - bpwopt.dequantize(plain_q, "Q4_K")).astype(np.float64)
    weighted_without = float((residual**2 * imatrix).sum())
    assert weighted_with < weighted_without


BAD_ARGUMENTS = [
    (lambda: bpwopt.quantize(np.zeros((2, 100), np.float32), "Q4_0"), "not a multiple"),
    (lambda: bpwopt.quantize(np.zeros((2, 288), np.float32), "Q4_K"), "block size 256"),
    (lambda: bpwopt.quantize(np.zeros((2, 256), np.float32), "Q7_X"), "supported: F32"),
    (lambda: bpwopt.quantize(np.zeros((2, 256), np.float32), 999), "unsupported"),
    (lambda: bpwopt.quantize(np.zeros((2, 256), np.float32), "IQ2_XXS"), "needs an importance matrix"),
    (lambda: bpwopt.quantize(np.zeros((2, 256), np.float32), "NVFP4"), "unsupported"),
    (lambda: bpwopt.quantize(np.zeros((2, 256), np.float64), "Q4_0"), "float32"),
    (lambda: bpwopt.quantize([[0.0] * 32], "Q4_0"), "float32"),
    (lambda: bpwopt.quantize(np.full((1, 32), np.nan, np.float32), "Q4_0"), "NaN"),
    (lambda: bpwopt.quantize(np.full((1, 32), np.inf, np.float32), "Q8_0"), "infinite"),
    (lambda: bpwopt.quantize(np.zeros((0,), np.float32), "Q8_0"), "at least one element"),
    (lambda: bpwopt.quantize(np.zeros((1, 32), np.float32), "Q4_0", np.ones(16, np.float32)), "shape"),
    (lambda: bpwopt.quantize(np.ones((1, 32), np.float32), "Q4_0", -np.ones(32, np.float32)), "negative"),
    (lambda: bpwopt.quantize(np.zeros((1, 32), np.float32), "Q4_0", np.ones(32, np.int32)), "floats"),
    (lambda: bpwopt.dequantize(np.zeros((2, 17), np.uint8), "Q4_0"), "18 bytes"),
    (lambda: bpwopt.dequantize(np.zeros((2, 18), np.int8), "Q4_0"), "uint8"),
    (lambda: bpwopt.quant_error(np.zeros((1, 31), np.float32), "Q8_0"), "not a multiple"),
]


@pytest.mark.parametrize(("call", "message"), BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("bits", [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001])  # ±inf, NaNs
@pytest.mark.parametrize("where", [0, 1000, 4095])  # first, middle, last word
def test_every_nonfinite_word_is_refused_wherever_it_is(bits, where):
    x = np.linspace(-3e38, 3e38, 4096, dtype=np.float32)  # FLT_MAX-sized values are finite
    x[7] = np.float32(1e-45)  # subnormal
    assert all_finite(x) and all_finite(x.reshape(16, 256)[:, ::3])
    x.view(np.uint32)[where] = bits
    assert not all_finite(x) and not all_finite(x.reshape(16, 256))
    with pytest.raises(ValueError, match="NaN or infinite"):
        bpwopt.quant.codec.quantize(x.reshape(16, 256), "F32")


@settings(max_examples=60, deadline=None)
@given(tensors(), st.integers(1, 3), st.booleans())
def test_row_energies_are_the_sums_of_the_decoded_rows_squares(case, experts, with_weights):
    quant_type, x = case
    rows = x.reshape(-1, x.shape[-1])
    imatrix = make_imatrix(rows.shape[1]) if quant_type.requires_imatrix else None
    q = bpwopt.quantize(rows, quant_type.name, imatrix)
    expert_of_row = np.arange(rows.shape[0]) % experts
    weights = np.stack([make_imatrix(rows.shape[1]) * (e + 1) for e in range(experts)]) if with_weights else None
    weighted, plain = bpwopt.quant.codec.row_energies(q, quant_type.name, weights, expert_of_row)
    squares = reference_dequantize(q, quant_type.ggml_type).astype(np.float64) ** 2
    np.testing.assert_allclose(plain, squares.sum(axis=1), rtol=1e-12)
    expected = (squares * weights[expert_of_row]).sum(axis=1) if with_weights else squares.sum(axis=1)
    np.testing.assert_allclose(weighted, expected, rtol=1e-12)


@pytest.mark.parametrize("bits", [0x7F800000, 0x7FC00000])  # inf, NaN
def test_a_row_with_a_nonfinite_value_has_a_nonfinite_energy_and_no_other_row_does(bits):
    x = np.full((3, 256), 3e38, dtype=np.float32)  # FLT_MAX-sized squares do not overflow the float64 sums
    x.view(np.uint32)[1, 100] = bits
    weighted, plain = bpwopt.quant.codec.row_energies(x.view(np.uint8), "F32", None, np.zeros(3, dtype=np.int64))
    assert np.isfinite(plain).tolist() == [True, False, True]
    assert np.isfinite(weighted).tolist() == [True, False, True]
