"""Symmetric K-quants: Q3_K and Q6_K (super-blocks of 256 = 16 sub-blocks of 16).

Each sub-block gets a signed scale from a search; the sixteen scales are then
quantized themselves against one fp16 super-block scale (6 bits each for Q3_K,
int8 for Q6_K), and finally every element is re-quantized against the scale
the decoder will actually see. Without an imatrix ggml runs
`quantize_row_q*_K_ref`, with one `quantize_row_q*_K_impl`; the two differ only
in how the scales are chosen and share the re-quantize-and-pack step. Byte
layouts are ggml's `block_q3_K` and `block_q6_K`.
"""

import math

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.numerics import (
    F32,
    GROUP_MAX_EPS,
    ONE,
    ZERO,
    load_fp16,
    nearest_int,
    nearest_int32,
    store_fp16,
    sum_of_squares,
)
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW
from bpwopt.quant.kernels.scale_search import make_q3_quants, make_qx_quants, signed_max

QK_K, _Q3_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q3_K]
_Q6_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K][1]
SUB = 16  # elements per sub-block
N_SUB = QK_K // SUB
_LANES = 32  # both types spread the bits of elements l, l+32, l+64, ... over one byte

# block_q3_K: hmask[QK_K/8] (bit 2 of each level), qs[QK_K/4] (bits 0-1), scales[12], d
_Q3_QS = QK_K // 8
_Q3_SCALES = _Q3_QS + QK_K // 4
_Q3_D = _Q3_SCALES + 12
Q3_NMAX = 4  # levels -4..3
Q3_SCALE_NMAX = 32  # 6-bit scales -32..31

# block_q6_K: ql[QK_K/2] (bits 0-3 of each level), qh[QK_K/4] (bits 4-5), int8 scales[16], d
_Q6_QH = QK_K // 2
_Q6_SCALES = _Q6_QH + QK_K // 4
_Q6_D = _Q6_SCALES + N_SUB
Q6_NMAX = 32  # levels -32..31


@njit(cache=True)
def _reciprocal(value):
    """C's 1/value: ±inf for ±0, where Numba would raise ZeroDivisionError."""
    if value == ZERO:
        return F32(math.copysign(math.inf, value))
    return ONE / value


@njit(cache=True)
def _requantize(block, d, scale_levels, scale_bias, nmax, levels, divisors):
    """Levels against the decoded sub-block scales d·(scale_level − scale_bias), clamped to −nmax..nmax−1.

    This is what makes the bytes consistent with the fp16 super-block scale.
    A sub-block whose decoded scale is zero keeps the levels of the search, as
    in ggml. Written as one flat loop over a per-element divisor (scratch of
    QK_K floats), with int32 min/max and np.divide (no zero-division branch),
    so that LLVM vectorizes it; the arithmetic is ggml's.
    """
    for j in range(N_SUB):
        divisors[j * SUB:(j + 1) * SUB] = d * F32(np.int64(scale_levels[j]) - scale_bias)
    low = np.int32(-nmax)
    high = np.int32(nmax - 1)
    for i in range(QK_K):
        level = max(low, min(high, nearest_int32(np.divide(block[i], divisors[i])))) + np.int32(nmax)
        search_level = np.int32(levels[i])  # int32 like `level`: mixed widths stop the vectorizer
        levels[i] = search_level if divisors[i] == ZERO else level


# ---------------------------------------------------------------- Q3_K


@njit(cache=True)
def _pack_q3_scales(scale_levels, out, offset):
    """Sixteen 6-bit scales into 12 bytes: low nibbles in bytes 0-7 (j and j+8 share one),
    the top two bits of scale j in byte 8 + j%4 at bit 2·(j//4)."""
    for k in range(8):
        low = np.int64(scale_levels[k]) & 0x0F
        high = np.int64(scale_levels[k + 8]) & 0x0F
        out[offset + k] = np.uint8(low | (high << 4))
    for k in range(4):
        top_bits = 0
        for quarter in range(4):
            top_bits |= ((np.int64(scale_levels[k + 4 * quarter]) >> 4) & 3) << (2 * quarter)
        out[offset + 8 + k] = np.uint8(top_bits)


@njit(cache=True)
def _q3_scale_level(row, offset, j):
    """6-bit scale j (0..63) of the 12 packed bytes at offset; the inverse of _pack_q3_scales."""
    low = (np.int64(row[offset + j % 8]) >> (4 * (j // 8))) & 0x0F
    top_bits = (np.int64(row[offset + 8 + j % 4]) >> (2 * (j // 4))) & 3
    return low | (top_bits << 4)


@njit(cache=True)
def _pack_q3_levels(levels, out, offset):
    """Levels 0..7: bit 2 of element e into hmask[e % 32] at bit e // 32, bits 0-1 into qs,
    where byte l of each 128-element half holds elements l, l+32, l+64, l+96."""
    for lane in range(_LANES):
        mask = 0
        for k in range(QK_K // _LANES):
            mask |= (np.int64(levels[k * _LANES + lane]) >> 2) << k
        out[offset + lane] = np.uint8(mask)
    for half in range(QK_K // 128):
        for lane in range(_LANES):
            low_bits = 0
            for k in range(4):
                low_bits |= (np.int64(levels[128 * half + k * _LANES + lane]) & 3) << (2 * k)
            out[offset + _Q3_QS + _LANES * half + lane] = np.uint8(low_bits)


@njit(cache=True)
def _q3_level(row, offset, e):
    """Level 0..7 of element e of the block at offset; the inverse of _pack_q3_levels."""
    half, within = e // 128, e % 128
    low_byte = np.int64(row[offset + _Q3_QS + _LANES * half + within % _LANES])
    low_bits = (low_byte >> (2 * (within // _LANES))) & 3
    high_bit = (np.int64(row[offset + e % _LANES]) >> (e // _LANES)) & 1
    return low_bits | (high_bit << 2)


@njit(cache=True)
def _q3_ref_scales(block, levels, sub_scales, scale_levels):
    """quantize_row_q3_K_ref's scales: make_q3_quants per sub-block (weights x²), then
    6-bit levels against the largest. Fills scale_levels (0..63), returns the super-block scale."""
    for j in range(N_SUB):
        sub = slice(j * SUB, (j + 1) * SUB)
        sub_scales[j] = make_q3_quants(Q3_NMAX, block[sub], levels[sub], True)
    max_scale, _ = signed_max(sub_scales)
    if max_scale == ZERO:
        scale_levels[:] = 0
        return ZERO
    iscale = F32(-Q3_SCALE_NMAX) / max_scale
    for j in range(N_SUB):
        level = np.int8(nearest_int(iscale * sub_scales[j]))  # C stores it in an int8_t
        scale_levels[j] = max(-Q3_SCALE_NMAX, min(Q3_SCALE_NMAX - 1, level)) + Q3_SCALE_NMAX
    return _reciprocal(iscale)


@njit(cache=True)
def _q3_imatrix_scales(block, importance, levels, sub_scales, weight, sub_weights, scale_levels):
    """quantize_row_q3_K_impl's scales: make_qx_quants per sub-block weighted by
    imatrix·sqrt(σ² + x²) with σ² = 2·mean(x²) over the block, then make_qx_quants
    on the sixteen scales weighted by each sub-block's total weight."""
    sigma2 = F32(2) * sum_of_squares(block) / F32(QK_K)
    for j in range(N_SUB):
        start = j * SUB
        total_weight = ZERO
        for i in range(SUB):
            value = block[start + i]
            weight[i] = importance[start + i] * np.sqrt(sigma2 + value * value)
            total_weight += weight[i]
        sub_weights[j] = total_weight
        sub = slice(start, start + SUB)
        sub_scales[j] = make_qx_quants(Q3_NMAX, block[sub], levels[sub], 1, weight)
    return make_qx_quants(Q3_SCALE_NMAX, sub_scales, scale_levels, 1, sub_weights)


@njit(cache=True)
def pack_q3_block(block, d, scale_levels, levels, divisors, out, offset):
    """Store scales and d, re-quantize against their decoded values, pack the levels."""
    _pack_q3_scales(scale_levels, out, offset + _Q3_SCALES)
    store_fp16(out, offset + _Q3_D, d)
    d_stored = load_fp16(out, offset + _Q3_D)
    _requantize(block, d_stored, scale_levels, Q3_SCALE_NMAX, Q3_NMAX, levels, divisors)
    _pack_q3_levels(levels, out, offset)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q3_k(x, imatrix, out):
    levels = np.empty(QK_K, dtype=np.int8)
    sub_scales = np.empty(N_SUB, dtype=np.float32)
    scale_levels = np.empty(N_SUB, dtype=np.int8)
    weight = np.empty(SUB, dtype=np.float32)
    sub_weights = np.empty(N_SUB, dtype=np.float32)
    divisors = np.empty(QK_K, dtype=np.float32)
    for b in range(x.size // QK_K):
        start = b * QK_K
        block = x[start:start + QK_K]
        if imatrix.size:
            importance = imatrix[start:start + QK_K]
            d = _q3_imatrix_scales(block, importance, levels, sub_scales, weight, sub_weights, scale_levels)
        else:
            d = _q3_ref_scales(block, levels, sub_scales, scale_levels)
        pack_q3_block(block, d, scale_levels, levels, divisors, out, b * _Q3_K_BYTES)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q3_k(q, out):
    for b in range(out.size // QK_K):
        offset = b * _Q3_K_BYTES
        d = load_fp16(q, offset + _Q3_D)
        for j in range(N_SUB):
            sub_d = d * F32(_q3_scale_level(q, offset + _Q3_SCALES, j) - Q3_SCALE_NMAX)
            for e in range(j * SUB, (j + 1) * SUB):
                out[b * QK_K + e] = sub_d * F32(_q3_level(q, offset, e) - Q3_NMAX)


# ---------------------------------------------------------------- Q6_K


@njit(cache=True)
def _q6_scales(block, importance, levels, sub_scales, scale_levels):
    """Scales shared by quantize_row_q6_K_ref and _impl: make_qx_quants per sub-block
    (weights: the imatrix as is, else x²), then int8 levels against the largest.

    Returns the super-block scale, or zero when every sub-block scale is below
    GROUP_MAX_EPS: ggml then stores an all-zero block.
    """
    for j in range(N_SUB):
        sub = slice(j * SUB, (j + 1) * SUB)
        weights = importance[sub] if importance.size else importance
        sub_scales[j] = make_qx_quants(Q6_NMAX, block[sub], levels[sub], 1, weights)
    max_scale, _ = signed_max(sub_scales)
    if abs(max_scale) < GROUP_MAX_EPS:
        return ZERO
    iscale = F32(-128) / max_scale
    for j in range(N_SUB):
        scale_levels[j] = np.int8(min(127, nearest_int(iscale * sub_scales[j])))
    return _reciprocal(iscale)


@njit(cache=True)
def _pack_q6_levels(levels, out, offset):
    """Levels 0..63, per 128-element half: ql byte l holds the low nibbles of elements l and
    l+64, byte 32+l those of l+32 and l+96; qh byte l holds bits 4-5 of l, l+32, l+64, l+96."""
    for half in range(QK_K // 128):
        first = 128 * half
        for lane in range(_LANES):
            q1 = np.int64(levels[first + lane])
            q2 = np.int64(levels[first + lane + 32])
            q3 = np.int64(levels[first + lane + 64])
            q4 = np.int64(levels[first + lane + 96])
            out[offset + 64 * half + lane] = np.uint8((q1 & 0x0F) | ((q3 & 0x0F) << 4))
            out[offset + 64 * half + lane + 32] = np.uint8((q2 & 0x0F) | ((q4 & 0x0F) << 4))
            top_bits = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
            out[offset + _Q6_QH + _LANES * half + lane] = np.uint8(top_bits)


@njit(cache=True)
def _q6_level(row, offset, e):
    """Level 0..63 of element e of the block at offset; the inverse of _pack_q6_levels."""
    half, within = e // 128, e % 128
    group, lane = within // _LANES, within % _LANES
    low_byte = np.int64(row[offset + 64 * half + 32 * (group % 2) + lane])
    low_bits = (low_byte >> (4 * (group // 2))) & 0x0F
    top_bits = (np.int64(row[offset + _Q6_QH + _LANES * half + lane]) >> (2 * group)) & 3
    return low_bits | (top_bits << 4)


@njit(cache=True)
def pack_q6_block(block, d, scale_levels, levels, divisors, out, offset):
    """Store scales and d, re-quantize against their decoded values, pack the levels."""
    for j in range(N_SUB):
        out[offset + _Q6_SCALES + j] = np.uint8(np.int64(scale_levels[j]) & 0xFF)
    store_fp16(out, offset + _Q6_D, d)
    d_stored = load_fp16(out, offset + _Q6_D)
    _requantize(block, d_stored, scale_levels, 0, Q6_NMAX, levels, divisors)
    _pack_q6_levels(levels, out, offset)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q6_k(x, imatrix, out):
    levels = np.empty(QK_K, dtype=np.int8)
    sub_scales = np.empty(N_SUB, dtype=np.float32)
    scale_levels = np.empty(N_SUB, dtype=np.int8)
    divisors = np.empty(QK_K, dtype=np.float32)
    for b in range(x.size // QK_K):
        start = b * QK_K
        offset = b * _Q6_K_BYTES
        block = x[start:start + QK_K]
        importance = imatrix[start:start + QK_K] if imatrix.size else imatrix
        d = _q6_scales(block, importance, levels, sub_scales, scale_levels)
        if d == ZERO:
            out[offset:offset + _Q6_K_BYTES] = 0
        else:
            pack_q6_block(block, d, scale_levels, levels, divisors, out, offset)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q6_k(q, out):
    for b in range(out.size // QK_K):
        offset = b * _Q6_K_BYTES
        d = load_fp16(q, offset + _Q6_D)
        for j in range(N_SUB):
            sub_d = d * F32(np.int8(q[offset + _Q6_SCALES + j]))
            for e in range(j * SUB, (j + 1) * SUB):
                out[b * QK_K + e] = sub_d * F32(_q6_level(q, offset, e) - Q6_NMAX)


KERNELS = {
    GGMLQuantizationType.Q3_K: (quantize_row_q3_k, dequantize_row_q3_k),
    GGMLQuantizationType.Q6_K: (quantize_row_q6_k, dequantize_row_q6_k),
}
