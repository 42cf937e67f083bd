"""MXFP4 quantizer (blocks of 32): OCP microscaling FP4, as gpt-oss ships its experts.

Each block stores one E8M0 exponent e (a power-of-two scale, 2^(e−127)) and one
4-bit E2M1 code per element. ggml works with the E2M1 values doubled
(`kvalues_fp4`: 0, ±1, ±2, ±3, ±4, ±6, ±8, ±12) and so with half the scale,
2^(e−128). ggml picks e = floor(log2 max|x|) − 2 + 127, which puts the block's
largest magnitude between 8 and 16 doubled units (the top level is 12: the
largest elements may clip). Every element takes the code whose value is
nearest (the first on ties). Like ggml's `quantize_mxfp4`, this ignores the
imatrix. The byte layout is ggml's `block_mxfp4` (e, then the codes: element
j in the low nibble of byte j, element j+16 in the high one).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.numerics import F32, ZERO
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW
from bpwopt.quant.tables import grid_table

BLOCK, _MXFP4_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.MXFP4]
HALF_BLOCK = BLOCK // 2
_POSITIVE_CODES = 8  # codes 0..7 are the levels 0..12, codes 8..15 their negatives (8 is −0)
# The doubled E2M1 values as float32 (int8 → float is exact), in code order: the order breaks ties.
_LEVELS = grid_table("kvalues_fp4").astype(np.float32)
_E8M0_BIAS = 127
_LEVEL_EXPONENT = 2  # with the halved scale, 2^(floor(log2 max|x|) − 3): max|x| lands at level 8 or above


@njit(cache=True)
def e8m0_to_fp32_half(e):
    """ggml's GGML_E8M0_TO_FP32_HALF: 2^(e−128) as float32 bits (subnormal for e < 2)."""
    e = np.uint32(e)
    bits = np.uint32(0x00200000) << e if e < 2 else (e - np.uint32(1)) << np.uint32(23)
    return np.uint32(bits).view(np.float32)


@njit(cache=True)
def _log2f(value):
    """C's log2f of a positive float32. The float64 log2 rounded to float32 agrees with glibc's
    (correctly rounded near the integers, where the floor of the result is decided)."""
    return F32(np.log2(np.float64(value)))


@njit(cache=True)
def _block_exponent(block):
    """E8M0 exponent of a block: floor(log2 max|x|) − 2 + 127, cast to uint8 as x86 does (through int32,
    low byte kept: blocks whose largest magnitude is below 2^−125 wrap around instead of clamping); 0 for
    an all-zero block."""
    amax = ZERO
    for value in block:
        amax = max(amax, abs(value))
    if amax <= ZERO:
        return 0
    exponent = np.floor(_log2f(amax)) - F32(_LEVEL_EXPONENT) + F32(_E8M0_BIAS)
    return np.int64(np.int32(exponent)) & 0xFF


@njit(cache=True)
def _nearest_codes(block, d, codes, best_error):
    """ggml's best_index_mxfp4 for every element: the first code minimizing |level·d − x| in float32.

    Only the eight codes of non-negative levels are searched, on |x|: for x ≥ 0 a negative level is never
    strictly closer than its positive twin, which comes first; for x < 0 the errors of the negative levels
    are, bit for bit, those of the positive ones for |x| (rounding is symmetric), and they come after code 0
    (level 0, error |x|), which beats every positive level. So x < 0 takes code 8 + k when |x| is nearest to
    positive level k > 0, else code 0. The loop over codes is outside the loop over elements, so that the
    elements vectorize; an element moves to a later code only when strictly closer, as in ggml.
    """
    for j in range(BLOCK):
        best_error[j] = abs(block[j])  # level 0
        codes[j] = 0
    for code in range(1, _POSITIVE_CODES):
        level = _LEVELS[code] * d
        for j in range(BLOCK):
            error = abs(level - abs(block[j]))
            closer = error < best_error[j]
            best_error[j] = error if closer else best_error[j]
            codes[j] = code if closer else codes[j]
    for j in range(BLOCK):
        codes[j] = codes[j] + _POSITIVE_CODES if block[j] < ZERO and codes[j] > 0 else codes[j]


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_mxfp4(x, imatrix, out):
    codes = np.empty(BLOCK, dtype=np.int32)
    best_error = np.empty(BLOCK, dtype=np.float32)
    for block in range(x.size // BLOCK):
        values = x[block * BLOCK : (block + 1) * BLOCK]
        e = _block_exponent(values)
        _nearest_codes(values, e8m0_to_fp32_half(e), codes, best_error)
        offset = block * _MXFP4_BYTES
        out[offset] = np.uint8(e)
        for j in range(HALF_BLOCK):
            out[offset + 1 + j] = codes[j] | (codes[j + HALF_BLOCK] << 4)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_mxfp4(q, out):
    for block in range(out.size // BLOCK):
        offset = block * _MXFP4_BYTES
        d = e8m0_to_fp32_half(q[offset])
        start = block * BLOCK
        for j in range(HALF_BLOCK):
            byte = np.int64(q[offset + 1 + j])
            out[start + j] = _LEVELS[byte & 0x0F] * d
            out[start + j + HALF_BLOCK] = _LEVELS[byte >> 4] * d


KERNELS = {
    GGMLQuantizationType.MXFP4: (quantize_row_mxfp4, dequantize_row_mxfp4),
}
