"""Binary quantizer: Q1_0 (blocks of 128, one sign bit per element).

Each block stores one fp16 scale, the mean of |x| over the block, and the
sign of every element (bit j of the block's bytes set for x_j ≥ 0, −0 included);
an element is read back as ±scale. ggml's `quantize_q1_0` calls the reference
quantizer with or without an imatrix, so the imatrix changes nothing. The byte
layout is ggml's `block_q1_0` struct.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.numerics import F32, ZERO, load_fp16, store_fp16
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW

BLOCK, _Q1_0_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q1_0]
_SIGN_BYTES = BLOCK // 8
_BLOCK_SIZE = F32(BLOCK)


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


KERNELS = {
    GGMLQuantizationType.Q1_0: (quantize_row_q1_0, dequantize_row_q1_0),
}
