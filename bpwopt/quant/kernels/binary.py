"""ggml's 1- and 2-bit block types: Q1_0 (blocks of 128, one sign bit per element) and Q2_0 (blocks of 64).

Q1_0: each block stores one fp16 scale, the mean of |x| over the block, and the
sign of every element (bit j of the block's bytes set for x_j ≥ 0, −0 included);
an element is read back as ±scale. ggml's `quantize_q1_0` calls the reference
quantizer with or without an imatrix, so the imatrix changes nothing. The byte
layout is ggml's `block_q1_0` struct.

Q2_0: each block stores one fp16 scale d, the block's largest |x|, and per element
round(x/d) + 1 clamped to 0..3 in 2 bits (four per byte, element j at bits 2(j%4)),
read back as (q − 1)·d: the levels −d, 0, d, 2d. The 2d level is reachable only by
rounding and so never used (|x| ≤ d); that is ggml's format as it is. The imatrix
changes nothing here either (`quantize_q2_0`), and the layout is `block_q2_0`.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.numerics import F32, ZERO, inverse_or_zero, load_fp16, roundf, store_fp16
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW

BLOCK, _Q1_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q1_0]
_SIGN_BYTES = BLOCK // 8
_BLOCK_SIZE = F32(BLOCK)
Q2_BLOCK, _Q2_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_0]


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q1_0(x, imatrix, out):
    for block in range(x.size // BLOCK):
        values = x[block * BLOCK : (block + 1) * BLOCK]
        # Summed left to right in float32, as the C loop does: the order decides the last bit of d.
        sum_abs = ZERO
        for value in values:
            sum_abs += abs(value)
        offset = block * _Q1_0_BYTES
        store_fp16(out, offset, sum_abs / _BLOCK_SIZE)
        for k in range(_SIGN_BYTES):
            bits = 0
            for b in range(8):
                bits |= np.int64(values[8 * k + b] >= ZERO) << b
            out[offset + 2 + k] = np.uint8(bits)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q1_0(q, out):
    for block in range(out.size // BLOCK):
        offset = block * _Q1_0_BYTES
        d = load_fp16(q, offset)
        for j in range(BLOCK):
            positive = (q[offset + 2 + j // 8] >> (j % 8)) & 1
            out[block * BLOCK + j] = d if positive else -d


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q2_0(x, imatrix, out):
    for block in range(x.size // Q2_BLOCK):
        values = x[block * Q2_BLOCK : (block + 1) * Q2_BLOCK]
        d = ZERO
        for value in values:
            d = max(d, abs(value))
        inverse_d = inverse_or_zero(d)
        offset = block * _Q2_0_BYTES
        store_fp16(out, offset, d)
        for k in range(Q2_BLOCK // 4):
            bits = 0
            for b in range(4):
                level = min(3, max(0, int(roundf(values[4 * k + b] * inverse_d)) + 1))
                bits |= level << (2 * b)
            out[offset + 2 + k] = np.uint8(bits)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q2_0(q, out):
    for block in range(out.size // Q2_BLOCK):
        offset = block * _Q2_0_BYTES
        d = load_fp16(q, offset)
        for j in range(Q2_BLOCK):
            level = (q[offset + 2 + j // 4] >> (2 * (j % 4))) & 3
            out[block * Q2_BLOCK + j] = F32(np.int64(level) - 1) * d


KERNELS = {
    GGMLQuantizationType.Q1_0: (quantize_row_q1_0, dequantize_row_q1_0),
    GGMLQuantizationType.Q2_0: (quantize_row_q2_0, dequantize_row_q2_0),
}
