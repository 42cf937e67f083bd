"""The scalar helpers that everything bit-exact rests on: rounding and half/bfloat conversions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpwopt.quant.kernels import floats, rows
from bpwopt.quant.kernels.numerics import fp16_bits_to_fp32, fp32_to_fp16_bits, nearest_int, roundf
from bpwopt.quant.reference import ggml_quantize

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def c_nearest_int(value: np.float32) -> int:
    """ggml's trick, replayed with numpy's IEEE float32 addition."""
    shifted = np.array([np.float32(value) + np.float32(12582912.0)], dtype=np.float32)
    return int((shifted.view(np.int32)[0] & 0x007FFFFF) - 0x00400000)


@settings(max_examples=500)
@given(finite_float32)
def test_nearest_int_is_ggmls_trick(value):
    assert nearest_int(np.float32(value)) == c_nearest_int(np.float32(value))


@pytest.mark.parametrize(("value", "expected"), [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2)])
def test_nearest_int_rounds_halves_to_even(value, expected):
    assert nearest_int(np.float32(value)) == expected


@settings(max_examples=500)
@given(finite_float32)
def test_roundf_rounds_halves_away_from_zero(value):
    expected = np.copysign(np.floor(abs(np.float64(value)) + 0.5), value)
    assert roundf(np.float32(value)) == np.float32(expected)


def test_roundf_on_the_float_just_below_one_half():
    assert roundf(np.nextafter(np.float32(0.5), np.float32(0))) == 0


def random_bit_patterns(count: int) -> np.ndarray:
    """Every class of float32: normals, subnormals, zeros, infinities and NaNs."""
    rng = np.random.default_rng(5)
    patterns = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 1, 0x477FF000,
                        0x477FEFFF, 0x38800000, 0x33000000, 0x33000001], dtype=np.uint32)
    return np.concatenate([special, patterns]).view(np.float32)


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_half_conversions_equal_ggml_on_every_kind_of_float(name):
    x = random_bit_patterns((1 << 16) - 12).reshape(-1, 64)
    quantize_row = {"F16": floats.quantize_row_f16, "BF16": floats.quantize_row_bf16}[name]
    ours = np.empty((x.shape[0], 128), dtype=np.uint8)
    rows.quantize_rows(quantize_row, np.ascontiguousarray(x), np.empty(0, np.float32), ours)
    np.testing.assert_array_equal(ours, ggml_quantize(x, name))


def test_fp16_round_trip_of_every_half():
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    values = np.array([fp16_bits_to_fp32(h) for h in halves[::97]], dtype=np.float32)
    finite = np.isfinite(values)
    back = np.array([fp32_to_fp16_bits(v) for v in values[finite]], dtype=np.uint16)
    np.testing.assert_array_equal(back, halves[::97][finite])
