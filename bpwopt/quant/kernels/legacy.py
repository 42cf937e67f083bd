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
from bpwopt.quant.kernels.scale_search import make_qkx3_quants, make_qx_quants, signed_max

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
def _to_uint8(value):
    return c_float_to_int(value) & 0xFF


@njit(cache=True)
def _min_max(x):
    lo = _FLOAT32_MAX
    hi = -lo
    for value in x:
        if value < lo:
            lo = value
        if value > hi:
            hi = value
    return lo, hi


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
def _symmetric_ref_levels(x, nmax, levels):
    """Q4_0/Q5_0 reference: d = max / −nmax, levels = trunc(x/d + nmax + ½); returns d."""
    max_value, _ = signed_max(x)
    d = max_value / F32(-nmax)
    inverse_d = inverse_or_zero(d)
    offset = F32(nmax) + HALF
    for j in range(QK):
        levels[j] = min(2 * nmax - 1, _to_int8(x[j] * inverse_d + offset)) & 0xFF
    return d


@njit(cache=True)
def _affine_ref_levels(x, nmax, levels, clamp):
    """Q4_1/Q5_1 reference: d = (max − min)/nmax, levels = trunc((x − min)/d + ½); returns (d, min)."""
    lo, hi = _min_max(x)
    d = (hi - lo) / F32(nmax)
    inverse_d = inverse_or_zero(d)
    for j in range(QK):
        scaled = (x[j] - lo) * inverse_d + HALF
        levels[j] = min(nmax, _to_int8(scaled)) & 0xFF if clamp else _to_uint8(scaled)
    return d, lo


@njit(cache=True)
def _symmetric_levels(block, imatrix, sigma2, nmax, levels, weight, signed_levels):
    """Scale and levels 0..2·nmax−1 of one symmetric block, with or without an imatrix."""
    if imatrix.size == 0:
        return _symmetric_ref_levels(block, nmax, levels)
    _importance(block, imatrix, sigma2, weight)
    d = make_qx_quants(nmax, block, signed_levels, 1, weight)
    for j in range(QK):
        levels[j] = signed_levels[j]
    return d


@njit(cache=True)
def _affine_levels(block, imatrix, sigma2, nmax, levels, weight, aux, clamp):
    """Scale, min and levels 0..nmax of one affine block, with or without an imatrix."""
    if imatrix.size == 0:
        return _affine_ref_levels(block, nmax, levels, clamp)
    _importance(block, imatrix, sigma2, weight)
    d, the_min = make_qkx3_quants(nmax, block, weight, levels, aux, F32(-0.9), F32(0.05), 36, False)
    return d, -the_min


@njit(cache=True)
def _quantize_symmetric(x, imatrix, out, nmax, block_bytes, has_high_bits):
    sigma2 = _row_sigma2(x) if imatrix.size else ZERO
    levels = np.empty(QK, dtype=np.uint8)
    weight = np.empty(QK, dtype=np.float32)
    signed_levels = np.empty(QK, dtype=np.int8)
    for block in range(x.size // QK):
        start = block * QK
        block_imatrix = imatrix[start:start + QK] if imatrix.size else imatrix
        d = _symmetric_levels(
            x[start:start + QK], block_imatrix, sigma2, nmax, levels, weight, signed_levels
        )
        offset = block * block_bytes
        store_fp16(out, offset, d)
        pack_levels(levels, out, offset + 2, has_high_bits)


@njit(cache=True)
def _quantize_affine(x, imatrix, out, nmax, block_bytes, has_high_bits):
    sigma2 = _row_sigma2(x) if imatrix.size else ZERO
    levels = np.empty(QK, dtype=np.uint8)
    weight = np.empty(QK, dtype=np.float32)
    aux = np.empty(QK, dtype=np.uint8)
    for block in range(x.size // QK):
        start = block * QK
        block_imatrix = imatrix[start:start + QK] if imatrix.size else imatrix
        d, lo = _affine_levels(
            x[start:start + QK], block_imatrix, sigma2, nmax, levels, weight, aux, not has_high_bits
        )
        offset = block * block_bytes
        store_fp16(out, offset, d)
        store_fp16(out, offset + 2, lo)
        pack_levels(levels, out, offset + 4, has_high_bits)


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
