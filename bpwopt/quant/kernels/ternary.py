"""Ternary quantizers: TQ1_0 and TQ2_0 (super-blocks of 256, BitNet b1.58 / TriLM weights).

Both store one fp16 scale d = max|x| per super-block and one trit per element,
round(x/d) ∈ {−1, 0, 1} stored as 0, 1, 2. TQ2_0 packs the trits as 2-bit
fields (four per byte, element m + 32·n of a 128-element group in bits 2n);
TQ1_0 packs five trits per byte as a base-3 number scaled into 0..255 (so a
trit is read back by multiplying, not dividing), and the last 16 elements four
per byte. Both follow ggml's `quantize_row_tq*_0_ref` and ignore the imatrix,
as ggml's `quantize_tq*_0` does. Byte layouts are ggml's `block_tq1_0` and
`block_tq2_0` structs.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.numerics import F32, ZERO, inverse_or_zero, load_fp16, store_fp16
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW

SUPER_BLOCK, _TQ1_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.TQ1_0]
_TQ2_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.TQ2_0][1]
_TQ1_QH = SUPER_BLOCK // 64  # bytes of four trits each, at the end of the trit bytes
_TQ1_QS = (SUPER_BLOCK - 4 * _TQ1_QH) // 5  # bytes of five trits each: one group of 32 bytes, one of 16
_TQ1_QS_WIDE = _TQ1_QS - _TQ1_QS % 32
_TQ2_QS = SUPER_BLOCK // 4
_GROUP = 32  # TQ2_0: a byte holds elements m, m+32, m+64, m+96 of a 128-element group
_HALF = F32(0.5)
_POW3 = np.array([1, 3, 9, 27, 81, 243], dtype=np.int32)


@njit(cache=True)
def _trits(x, trits):
    """round(x/max|x|) + 1 for every element (0, 1, 2); returns the scale max|x|.

    ggml rounds with lroundf (halves away from zero). Since |x/max| ≤ 1 up to
    a rounding error, that is two comparisons with ±½, which vectorize. When
    max|x| is so small that 1/max overflows, x·(1/max) is ±inf or NaN, and
    lroundf returns LONG_MIN there, whose low 32 bits (all that ggml's `int`
    keeps) are 0: every trit is then 1.
    """
    amax = ZERO
    for value in x:
        amax = max(amax, abs(value))
    inverse = inverse_or_zero(amax)
    if np.isinf(inverse):
        trits[:] = 1
        return amax
    for j in range(x.size):
        scaled = x[j] * inverse
        trits[j] = 1 + np.uint8(scaled >= _HALF) - np.uint8(scaled <= -_HALF)
    return amax


@njit(cache=True)
def _pack_base3(trits, start, count, stride):
    """`count` trits (start, start+stride, …), most significant first, scaled to a byte by ceil(q·256/243)."""
    q = 0
    for n in range(count):
        q = q * 3 + np.int64(trits[start + n * stride])
    if count == 4:
        q *= 3  # the first trit goes to the most significant of five places
    return np.uint8((q * 256 + 242) // 243)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_tq1_0(x, imatrix, out):
    trits = np.empty(SUPER_BLOCK, dtype=np.uint8)
    for sb in range(x.size // SUPER_BLOCK):
        d = _trits(x[sb * SUPER_BLOCK : (sb + 1) * SUPER_BLOCK], trits)
        offset = sb * _TQ1_BYTES
        # Bytes 0..31 take elements m + 32n (n = 0..4), bytes 32..47 elements 160 + m + 16n,
        # bytes 48..51 elements 240 + j + 4n (n = 0..3).
        for m in range(_TQ1_QS_WIDE):
            out[offset + m] = _pack_base3(trits, m, 5, 32)
        for m in range(_TQ1_QS - _TQ1_QS_WIDE):
            out[offset + _TQ1_QS_WIDE + m] = _pack_base3(trits, 5 * _TQ1_QS_WIDE + m, 5, 16)
        for j in range(_TQ1_QH):
            out[offset + _TQ1_QS + j] = _pack_base3(trits, 5 * _TQ1_QS + j, 4, _TQ1_QH)
        store_fp16(out, offset + _TQ1_QS + _TQ1_QH, d)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_tq2_0(x, imatrix, out):
    trits = np.empty(SUPER_BLOCK, dtype=np.uint8)
    for sb in range(x.size // SUPER_BLOCK):
        d = _trits(x[sb * SUPER_BLOCK : (sb + 1) * SUPER_BLOCK], trits)
        offset = sb * _TQ2_BYTES
        for j in range(_TQ2_QS):
            start = (j // _GROUP) * 4 * _GROUP + j % _GROUP
            out[offset + j] = (
                trits[start]
                | (trits[start + _GROUP] << 2)
                | (trits[start + 2 * _GROUP] << 4)
                | (trits[start + 3 * _GROUP] << 6)
            )
        store_fp16(out, offset + _TQ2_QS, d)


@njit(cache=True)
def _unpack_base3(byte, n):
    """Trit n (0 = most significant) of a TQ1_0 byte, as −1, 0, 1: shift it to the top by ·3ⁿ mod 256, read ·3 >> 8."""
    q = (np.int32(byte) * _POW3[n]) & np.int32(0xFF)
    return ((q * np.int32(3)) >> np.int32(8)) - np.int32(1)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_tq1_0(q, out):
    for sb in range(out.size // SUPER_BLOCK):
        offset = sb * _TQ1_BYTES
        d = load_fp16(q, offset + _TQ1_QS + _TQ1_QH)
        y = sb * SUPER_BLOCK
        for n in range(5):
            for m in range(_TQ1_QS_WIDE):
                out[y + n * 32 + m] = F32(_unpack_base3(q[offset + m], n)) * d
        y += 5 * _TQ1_QS_WIDE
        for n in range(5):
            for m in range(_TQ1_QS - _TQ1_QS_WIDE):
                out[y + n * 16 + m] = F32(_unpack_base3(q[offset + _TQ1_QS_WIDE + m], n)) * d
        y += 5 * (_TQ1_QS - _TQ1_QS_WIDE)
        for n in range(4):
            for j in range(_TQ1_QH):
                out[y + n * _TQ1_QH + j] = F32(_unpack_base3(q[offset + _TQ1_QS + j], n)) * d


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_tq2_0(q, out):
    for sb in range(out.size // SUPER_BLOCK):
        offset = sb * _TQ2_BYTES
        d = load_fp16(q, offset + _TQ2_QS)
        for group in range(_TQ2_QS // _GROUP):
            start = sb * SUPER_BLOCK + group * 4 * _GROUP
            for n in range(4):
                for m in range(_GROUP):
                    code = (np.int32(q[offset + group * _GROUP + m]) >> np.int32(2 * n)) & np.int32(3)
                    out[start + n * _GROUP + m] = F32(code - np.int32(1)) * d


KERNELS = {
    GGMLQuantizationType.TQ1_0: (quantize_row_tq1_0, dequantize_row_tq1_0),
    GGMLQuantizationType.TQ2_0: (quantize_row_tq2_0, dequantize_row_tq2_0),
}
