"""Scalar helpers that make Numba arithmetic match ggml's C bit for bit.

Every quantizer in `bpwopt.quant.kernels` is built on these: ggml rounds with a
magic-number trick (`nearest_int`), C's `roundf` (half away from zero), and
converts scales to IEEE half precision with its own routine. Numba would
otherwise round half to even, or promote float32 to float64 where C stays in
float32, and the bytes would drift.
"""

import math

import numpy as np
from numba import njit

F32 = np.float32
ZERO = F32(0.0)
ONE = F32(1.0)
HALF = F32(0.5)
GROUP_MAX_EPS = F32(1e-15)
FLOAT_MAX = F32(np.finfo(np.float32).max)  # C's FLT_MAX, where ggml starts a search for the least error

_ROUNDING_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves the integer in the mantissa


@njit(cache=True)
def nearest_int32(value):
    """ggml's nearest_int: round half to even through float32 addition of 1.5*2**23.

    Returns exactly what the C trick returns, also outside its documented
    range (|value| > 4194303), where it wraps instead of saturating. The
    result is an np.int32, so loops over it vectorize with 32-bit lanes.
    """
    shifted = F32(value) + _ROUNDING_MAGIC
    bits = np.int32(np.float32(shifted).view(np.int32))
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


@njit(cache=True)
def nearest_int(value):
    """nearest_int32 as a Python int."""
    return int(nearest_int32(value))


@njit(cache=True)
def nearest_int_float(value):
    """nearest_int(value) as a float32, for |value| < 2**22: the same rounding without the
    trip through an integer register, so loops over it vectorize. NaN stays NaN."""
    return (F32(value) + _ROUNDING_MAGIC) - _ROUNDING_MAGIC


@njit(cache=True)
def roundf(value):
    """C's roundf on a float32: halves round away from zero; inf and NaN pass through."""
    wide = np.float64(value)
    if not np.isfinite(wide):
        return F32(wide)
    truncated = np.floor(abs(wide))
    if abs(wide) - truncated >= 0.5:
        truncated += 1.0
    return F32(math.copysign(truncated, wide))


@njit(cache=True)
def odd_multiplier_level(inverse_d, scale, max_level):
    """The l with 2l+1 ≈ scale/d, clamped to 0..max_level: how the i-quants store a block scale as an
    odd multiple of the super-block's d (1/d is inf where d underflows, as in C)."""
    return max(0, min(max_level, nearest_int(HALF * (inverse_d * scale - ONE))))


@njit(cache=True)
def inverse_or_zero(d):
    """ggml's `id = d ? 1/d : 0`: the inverse scale, 0 for an all-zero block."""
    return ONE / d if d != ZERO else ZERO


@njit(cache=True)
def fp32_to_fp16_bits(value):
    """IEEE binary16 bits of a float32, round to nearest even, as ggml converts it."""
    scale_to_inf = np.uint32(0x77800000).view(np.float32)
    scale_to_zero = np.uint32(0x08800000).view(np.float32)
    base = (abs(F32(value)) * scale_to_inf) * scale_to_zero
    word = np.uint32(F32(value).view(np.uint32))
    shl1_word = np.uint32(word + word)
    sign = word & np.uint32(0x80000000)
    bias = shl1_word & np.uint32(0xFF000000)
    if bias < np.uint32(0x71000000):
        bias = np.uint32(0x71000000)
    base = np.uint32((bias >> np.uint32(1)) + np.uint32(0x07800000)).view(np.float32) + base
    base_bits = np.uint32(F32(base).view(np.uint32))
    exp_bits = (base_bits >> np.uint32(13)) & np.uint32(0x00007C00)
    mantissa_bits = base_bits & np.uint32(0x00000FFF)
    nonsign = exp_bits + mantissa_bits
    if shl1_word > np.uint32(0xFF000000):
        nonsign = np.uint32(0x7E00)
    return np.uint16((sign >> np.uint32(16)) | nonsign)


def _half_to_float_table() -> np.ndarray:
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


_HALF_TO_FLOAT = _half_to_float_table()


@njit(cache=True)
def fp16_bits_to_fp32(bits):
    """float32 value of IEEE binary16 bits (exact; a table lookup)."""
    return _HALF_TO_FLOAT[bits]


@njit(cache=True)
def round_to_fp16(value):
    """The float32 a value becomes after a trip through half precision."""
    return _HALF_TO_FLOAT[fp32_to_fp16_bits(value)]


@njit(cache=True)
def fp32_to_bf16_bits(value):
    """bfloat16 bits of a float32, round to nearest even, NaNs quieted (ggml's rule)."""
    word = np.uint32(F32(value).view(np.uint32))
    if (word & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((word >> np.uint32(16)) | np.uint32(64))
    rounding = np.uint32(0x7FFF) + ((word >> np.uint32(16)) & np.uint32(1))
    return np.uint16((word + rounding) >> np.uint32(16))


@njit(cache=True)
def bf16_bits_to_fp32(bits):
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@njit(cache=True)
def store_u16(out, offset, bits):
    """Write a little-endian uint16 into a byte row."""
    out[offset] = np.uint8(bits & 0xFF)
    out[offset + 1] = np.uint8((bits >> 8) & 0xFF)


@njit(cache=True)
def load_u16(row, offset):
    return np.uint16(row[offset]) | (np.uint16(row[offset + 1]) << np.uint16(8))


@njit(cache=True)
def store_fp16(out, offset, value):
    store_u16(out, offset, fp32_to_fp16_bits(value))


@njit(cache=True)
def load_fp16(row, offset):
    return _HALF_TO_FLOAT[load_u16(row, offset)]


@njit(cache=True)
def sum_of_squares(x):
    """Σ x², accumulated left to right in float32 like the C loops."""
    total = ZERO
    for value in x:
        total += value * value
    return total
