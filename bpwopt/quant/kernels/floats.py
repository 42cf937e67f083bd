"""Unquantized storage types: F32, F16, BF16 (one element per block).

F16 rounds to nearest even (NaN becomes 0x7E00), BF16 rounds to nearest even
and quiets NaNs, both exactly as ggml converts; F32 is a byte copy.
"""

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.numerics import (
    bf16_bits_to_fp32,
    fp32_to_bf16_bits,
    fp32_to_fp16_bits,
    load_fp16,
    load_u16,
)
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_f32(x, imatrix, out):
    # A loop over float32 words: Numba's byte-wise slice copy runs at a third of the speed.
    words = out.view(np.float32)
    for j in range(x.size):
        words[j] = x[j]


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_f32(q, out):
    out[:] = q.view(np.float32)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_f16(x, imatrix, out):
    halves = out.view(np.uint16)  # whole little-endian words: the loop vectorizes
    for j in range(x.size):
        halves[j] = fp32_to_fp16_bits(x[j])


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_f16(q, out):
    for j in range(out.size):
        out[j] = load_fp16(q, 2 * j)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_bf16(x, imatrix, out):
    halves = out.view(np.uint16)
    for j in range(x.size):
        halves[j] = fp32_to_bf16_bits(x[j])


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_bf16(q, out):
    for j in range(out.size):
        out[j] = bf16_bits_to_fp32(load_u16(q, 2 * j))


KERNELS = {
    GGMLQuantizationType.F32: (quantize_row_f32, dequantize_row_f32),
    GGMLQuantizationType.F16: (quantize_row_f16, dequantize_row_f16),
    GGMLQuantizationType.BF16: (quantize_row_bf16, dequantize_row_bf16),
}
