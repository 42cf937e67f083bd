"""Legacy block quantizers: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32).

Without an imatrix these follow ggml's `quantize_row_*_ref` (scale from the
block's extreme value); with one, the `quantize_row_*_impl` search that
weights each element by imatrix · sqrt(σ² + x²). Q8_0 ignores the imatrix, as
ggml does. Byte layouts are ggml's `block_q*` structs.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.numerics import (
    F32,
    HALF,
    ZERO,
    inverse_or_zero,
    load_fp16,
    roundf,
    store_fp16,
    sum_of_squares,
)
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW
from bpwopt.quant.kernels.scale_search import affine_quants_row, make_qx_quants

QK, _ = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
HALF_QK = QK // 2
_Q4_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0][1]
_Q4_1_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_1][1]
_Q5_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0][1]
_Q5_1_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_1][1]
_Q8_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][1]
_FLOAT32_MAX = np.float32(np.finfo(np.float32).max)


@njit(cache=True)
def c_float_to_int(value):
    """C's (int) conversion of a float as x86 performs it: out of range or NaN gives INT_MIN."""
    wide = np.float64(value)
    in_range = -2147483648.0 <= wide < 2147483648.0
    # A select rather than a branch, so that LLVM can vectorize the loops calling this.
    return np.int64(wide if in_range else -2147483648.0)


@njit(cache=True)
def _to_int8(value):
    """(int8_t) of a float: truncate to int32 as x86 does, keep the low byte, signed."""
    low = c_float_to_int(value) & 0xFF
    return low - 256 if low > 127 else low


@njit(cache=True)
def _importance(x, imatrix, sigma2, weight):
    """ggml's per-element weight for the legacy searches: imatrix · sqrt(σ² + x²)."""
    for j in range(x.size):
        weight[j] = imatrix[j] * np.sqrt(sigma2 + x[j] * x[j])


@njit(cache=True)
def _row_sigma2(x):
    return sum_of_squares(x) / F32(x.size)


@njit(cache=True)
def _pack_nibbles(levels, out, offset):
    for j in range(HALF_QK):
        out[offset + j] = np.uint8((levels[j] & 0x0F) | ((levels[j + HALF_QK] & 0x0F) << 4))


@njit(cache=True)
def pack_levels(levels, out, offset, has_high_bits):
    """A block's 32 levels from offset: Q5's fifth bits (4 bytes) first when the type has them, then the nibbles."""
    if has_high_bits:
        _pack_high_bits(levels, out, offset)
        offset += 4
    _pack_nibbles(levels, out, offset)


@njit(cache=True)
def _pack_high_bits(levels, out, offset):
    """The fifth bit of each level, as a little-endian uint32 (Q5_0 / Q5_1 `qh`)."""
    qh = 0
    for j in range(HALF_QK):
        qh |= ((levels[j] & 0x10) >> 4) << j
        qh |= ((levels[j + HALF_QK] & 0x10) >> 4) << (j + HALF_QK)
    for k in range(4):
        out[offset + k] = np.uint8((qh >> (8 * k)) & 0xFF)


@njit(cache=True)
def _c_float_to_int32(value):
    """c_float_to_int for a float32, in 32-bit lanes: the select keeps the loops calling it vectorized."""
    in_range = (value >= F32(-2147483648.0)) & (value < F32(2147483648.0))
    return np.int32(value) if in_range else np.int32(-2147483648)


@njit(cache=True)
def _c_float_to_int8(value):
    """(int8_t) of a float32 as x86 performs it, as an int32."""
    low = np.int32(_c_float_to_int32(value) & np.int32(0xFF))
    return np.int32(low - np.int32(256)) if low > np.int32(127) else low


@njit(cache=True)
def _float_bits(value):
    return np.int32(F32(value).view(np.int32))


@njit(cache=True)
def _is_nan_bits(bits):
    return np.int32(bits & np.int32(0x7FFFFFFF)) > np.int32(0x7F800000)


@njit(cache=True)
def _order_key(bits):
    """An int32 that orders float32 bits as their values (−0 just below +0), so the
    block extremes are integer reductions, which vectorize where float ones may not."""
    return np.int32(bits ^ np.int32(np.int32(bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@njit(cache=True)
def _first_of_value(block, value):
    """The first element of block equal to value: it carries the sign a C min/max loop keeps for ±0."""
    for element in block:
        if element == value:
            return element
    return value


@njit(cache=True)
def _block_extremes(block):
    """Least and greatest element of a 32-element block, NaNs skipped, FLT_MAX / −FLT_MAX
    when none; a zero extreme may carry either sign."""
    lo_key = _order_key(_float_bits(_FLOAT32_MAX))
    hi_key = _order_key(_float_bits(-_FLOAT32_MAX))
    for j in range(QK):
        bits = _float_bits(block[j])
        key = _order_key(bits)
        nan = _is_nan_bits(bits)
        lo_key = min(lo_key, np.int32(0x7FFFFFFF) if nan else key)
        hi_key = max(hi_key, np.int32(-2147483648) if nan else key)
    # The key map is its own inverse.
    return np.int32(_order_key(lo_key)).view(np.float32), np.int32(_order_key(hi_key)).view(np.float32)


@njit(cache=True)
def _first_of_either(block, first, second):
    """Whichever of two values comes first in block (first when neither does)."""
    for element in block:
        if element == first:
            return first
        if element == second:
            return second
    return first


@njit(cache=True)
def _block_signed_max(block):
    """signed_max(block)[0] of a 32-element block: the first element of largest magnitude
    (NaNs skipped), +0 for an all-zero block."""
    lo, hi = _block_extremes(block)
    if hi > -lo:
        return hi
    if hi < -lo:
        return lo
    if hi <= ZERO:  # all zero, or nothing but NaNs: C keeps its initial +0
        return ZERO
    return _first_of_either(block, hi, lo)


@njit(cache=True)
def _block_min_max(block):
    """C's `if (v < min) min = v; if (v > max) max = v;` over a 32-element block, from
    FLT_MAX / −FLT_MAX, NaNs skipped: a zero extreme is the block's first zero, with its sign."""
    lo, hi = _block_extremes(block)
    if lo == ZERO:
        lo = _first_of_value(block, lo)
    if hi == ZERO:
        hi = _first_of_value(block, hi)
    return lo, hi


@njit(cache=True)
def _store_high_bits(qh, out, offset):
    for k in range(4):
        out[offset + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))


@njit(cache=True)
def _quantize_symmetric_ref(x, out, nmax, block_bytes, has_high_bits):
    """Q4_0/Q5_0 reference: d = max / −nmax, levels = min(2·nmax−1, (int8)(x/d + nmax + ½))."""
    top = np.int32(2 * nmax - 1)
    level_offset = F32(nmax) + HALF
    nibbles = 6 if has_high_bits else 2
    for block_index in range(x.size // QK):
        block = x[block_index * QK:(block_index + 1) * QK]
        d = _block_signed_max(block) / F32(-nmax)
        inverse_d = inverse_or_zero(d)
        offset = block_index * block_bytes
        store_fp16(out, offset, d)
        qs = out[offset + nibbles:offset + nibbles + HALF_QK]
        qh = np.uint32(0)
        for j in range(HALF_QK):
            low = min(top, _c_float_to_int8(block[j] * inverse_d + level_offset)) & np.int32(0xFF)
            high = min(top, _c_float_to_int8(block[j + HALF_QK] * inverse_d + level_offset)) & np.int32(0xFF)
            if has_high_bits:
                qs[j] = np.uint8((low & np.int32(0x0F)) | ((high & np.int32(0x0F)) << np.int32(4)))
                qh |= np.uint32((low >> np.int32(4)) & np.int32(1)) << np.uint32(j)
                qh |= np.uint32((high >> np.int32(4)) & np.int32(1)) << np.uint32(j + HALF_QK)
            else:
                qs[j] = np.uint8((low | (high << np.int32(4))) & np.int32(0xFF))
        if has_high_bits:
            _store_high_bits(qh, out, offset + 2)


@njit(cache=True)
def _quantize_affine_ref(x, out, nmax, block_bytes, has_high_bits):
    """Q4_1/Q5_1 reference: d = (max − min)/nmax, levels = (x − min)/d + ½ truncated,
    clamped to 15 through int8 for Q4_1 and taken mod 256 through uint8 for Q5_1, as in C."""
    nibbles = 8 if has_high_bits else 4
    for block_index in range(x.size // QK):
        block = x[block_index * QK:(block_index + 1) * QK]
        lo, hi = _block_min_max(block)
        d = (hi - lo) / F32(nmax)
        inverse_d = inverse_or_zero(d)
        offset = block_index * block_bytes
        store_fp16(out, offset, d)
        store_fp16(out, offset + 2, lo)
        qs = out[offset + nibbles:offset + nibbles + HALF_QK]
        qh = np.uint32(0)
        for j in range(HALF_QK):
            scaled_low = (block[j] - lo) * inverse_d + HALF
            scaled_high = (block[j + HALF_QK] - lo) * inverse_d + HALF
            if has_high_bits:
                low = _c_float_to_int32(scaled_low) & np.int32(0xFF)
                high = _c_float_to_int32(scaled_high) & np.int32(0xFF)
                qs[j] = np.uint8((low & np.int32(0x0F)) | ((high & np.int32(0x0F)) << np.int32(4)))
                qh |= np.uint32((low >> np.int32(4)) & np.int32(1)) << np.uint32(j)
                qh |= np.uint32((high >> np.int32(4)) & np.int32(1)) << np.uint32(j + HALF_QK)
            else:
                low = min(np.int32(nmax), _c_float_to_int8(scaled_low)) & np.int32(0xFF)
                high = min(np.int32(nmax), _c_float_to_int8(scaled_high)) & np.int32(0xFF)
                qs[j] = np.uint8((low | (high << np.int32(4))) & np.int32(0xFF))
        if has_high_bits:
            _store_high_bits(qh, out, offset + 4)


@njit(cache=True)
def _symmetric_levels(block, imatrix, sigma2, nmax, levels, weight, signed_levels):
    """Scale and levels 0..2·nmax−1 of one symmetric block with an imatrix."""
    _importance(block, imatrix, sigma2, weight)
    d = make_qx_quants(nmax, block, signed_levels, 1, weight)
    for j in range(QK):
        levels[j] = signed_levels[j]
    return d


@njit(cache=True)
def _quantize_symmetric(x, imatrix, out, nmax, block_bytes, has_high_bits):
    if imatrix.size == 0:
        _quantize_symmetric_ref(x, out, nmax, block_bytes, has_high_bits)
        return
    sigma2 = _row_sigma2(x)
    levels = np.empty(QK, dtype=np.uint8)
    weight = np.empty(QK, dtype=np.float32)
    signed_levels = np.empty(QK, dtype=np.int8)
    for block in range(x.size // QK):
        start = block * QK
        block_imatrix = imatrix[start:start + QK]
        d = _symmetric_levels(
            x[start:start + QK], block_imatrix, sigma2, nmax, levels, weight, signed_levels
        )
        offset = block * block_bytes
        store_fp16(out, offset, d)
        pack_levels(levels, out, offset + 2, has_high_bits)


@njit(cache=True)
def _quantize_affine(x, imatrix, out, nmax, block_bytes, has_high_bits):
    if imatrix.size == 0:
        _quantize_affine_ref(x, out, nmax, block_bytes, has_high_bits)
        return
    n_blocks = x.size // QK
    weight = np.empty(x.size, dtype=np.float32)
    _importance(x, imatrix, _row_sigma2(x), weight)
    levels = np.empty(x.size, dtype=np.uint8)
    scales = np.empty(n_blocks, dtype=np.float32)
    the_mins = np.empty(n_blocks, dtype=np.float32)
    affine_quants_row(nmax, x, weight, QK, levels, scales, the_mins, F32(-0.9), F32(0.05), 36, False, True)
    for block in range(n_blocks):
        offset = block * block_bytes
        store_fp16(out, offset, scales[block])
        store_fp16(out, offset + 2, -the_mins[block])
        pack_levels(levels[block * QK:(block + 1) * QK], out, offset + 4, has_high_bits)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q4_0(x, imatrix, out):
    _quantize_symmetric(x, imatrix, out, 8, _Q4_0_BYTES, False)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q5_0(x, imatrix, out):
    _quantize_symmetric(x, imatrix, out, 16, _Q5_0_BYTES, True)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q4_1(x, imatrix, out):
    _quantize_affine(x, imatrix, out, 15, _Q4_1_BYTES, False)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q5_1(x, imatrix, out):
    _quantize_affine(x, imatrix, out, 31, _Q5_1_BYTES, True)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q8_0(x, imatrix, out):
    for block in range(x.size // QK):
        values = x[block * QK:(block + 1) * QK]
        amax = ZERO
        for value in values:
            amax = max(amax, abs(value))
        d = amax / F32(127)
        inverse_d = inverse_or_zero(d)
        offset = block * _Q8_0_BYTES
        store_fp16(out, offset, d)
        for j in range(QK):
            out[offset + 2 + j] = np.uint8(_to_int8(roundf(values[j] * inverse_d)) & 0xFF)


@njit(cache=True)
def _unpack_level(row, offset, j, high_bits_offset):
    """Level j (0..31) of a block: low nibble, plus the fifth bit when the type has one."""
    byte = np.int64(row[offset + j % HALF_QK])
    level = (byte & 0x0F) if j < HALF_QK else (byte >> 4)
    if high_bits_offset >= 0:
        level |= ((np.int64(row[high_bits_offset + j // 8]) >> (j % 8)) & 1) << 4
    return level


@njit(cache=True)
def _dequantize_legacy(q, out, block_bytes, center, has_min, has_high_bits):
    for block in range(out.size // QK):
        offset = block * block_bytes
        d = load_fp16(q, offset)
        lo = load_fp16(q, offset + 2) if has_min else ZERO
        header = 4 if has_min else 2
        high_bits_offset = offset + header if has_high_bits else -1
        nibbles = offset + header + (4 if has_high_bits else 0)
        for j in range(QK):
            level = F32(_unpack_level(q, nibbles, j, high_bits_offset) - center)
            out[block * QK + j] = level * d + lo if has_min else level * d


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q4_0(q, out):
    _dequantize_legacy(q, out, _Q4_0_BYTES, 8, False, False)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q4_1(q, out):
    _dequantize_legacy(q, out, _Q4_1_BYTES, 0, True, False)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q5_0(q, out):
    _dequantize_legacy(q, out, _Q5_0_BYTES, 16, False, True)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q5_1(q, out):
    _dequantize_legacy(q, out, _Q5_1_BYTES, 0, True, True)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q8_0(q, out):
    for block in range(out.size // QK):
        offset = block * _Q8_0_BYTES
        d = load_fp16(q, offset)
        for j in range(QK):
            level = np.int8(q[offset + 2 + j])
            out[block * QK + j] = F32(level) * d


KERNELS = {
    GGMLQuantizationType.Q4_0: (quantize_row_q4_0, dequantize_row_q4_0),
    GGMLQuantizationType.Q4_1: (quantize_row_q4_1, dequantize_row_q4_1),
    GGMLQuantizationType.Q5_0: (quantize_row_q5_0, dequantize_row_q5_0),
    GGMLQuantizationType.Q5_1: (quantize_row_q5_1, dequantize_row_q5_1),
    GGMLQuantizationType.Q8_0: (quantize_row_q8_0, dequantize_row_q8_0),
}
