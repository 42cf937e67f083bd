"""Non-linear 4-bit quantizers: IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256).

Both map each element to one of 16 fixed, non-uniform levels (`KVALUES_IQ4NL`)
times a block scale. The scale of every 32-element block comes from ggml's
`quantize_row_iq4_nl_impl` search: start from the block's extreme value, then
try 15 nearby scales and keep the one that minimizes the weighted squared
error. The weights are x² without an imatrix, imatrix · sqrt(σ² + x²) with one.
IQ4_NL stores that scale as fp16 per block; IQ4_XS stores one fp16 scale per
super-block and a 6-bit multiplier of it per block. Byte layouts are ggml's
`block_iq4_nl` and `block_iq4_xs` structs.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.numerics import (
    F32,
    GROUP_MAX_EPS,
    ONE,
    ZERO,
    inverse_or_zero,
    load_fp16,
    load_u16,
    nearest_int,
    store_fp16,
    store_u16,
    sum_of_squares,
)
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW
from bpwopt.quant.kernels.scale_search import signed_max

KVALUES_IQ4NL = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)
# The same levels as float32: int8 → float is exact, and the hot loops then skip the conversion.
_LEVELS = KVALUES_IQ4NL.astype(np.float32)
_LOWEST_LEVEL = int(KVALUES_IQ4NL[0])
_HIGHEST_FLOOR = int(KVALUES_IQ4NL[-1]) - 1
# For each integer k from the lowest level up to the highest's floor, the last level ≤ k. The levels
# are integers, so the last level ≤ x is the last level ≤ floor(x): a lookup replaces the search.
_LEVEL_BELOW = np.searchsorted(KVALUES_IQ4NL, np.arange(_LOWEST_LEVEL, _HIGHEST_FLOOR + 1), side="right") - 1

BLOCK, _NL_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_NL]
SUPER_BLOCK, _XS_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ4_XS]
HALF_BLOCK = BLOCK // 2
_NL_QS = _NL_BYTES - BLOCK // 2  # the nibbles follow the fp16 scale
_XS_SCALES_H = 2  # uint16: bits 4..5 of every block's 6-bit scale
_XS_SCALES_L = 4  # uint8[SUPER_BLOCK/64]: bits 0..3 of the block scales, two per byte
XS_QS = _XS_BYTES - SUPER_BLOCK // 2
XS_SCALE_BIAS = 32  # block multipliers −32..31 are stored as 0..63
_NTRY = 7  # scale candidates on each side of the first guess, as ggml_quantize_chunk uses


@njit(cache=True)
def _nearest_level(value):
    """ggml's best_index_int8 over the levels without its branchy binary search, to the same index.

    floor(value) is clamped into the table: below the lowest level the comparison
    then picks level 0, above the highest level (or NaN, as in the search) 15.
    """
    k = np.floor(value)
    k = k if k < F32(_HIGHEST_FLOOR) else F32(_HIGHEST_FLOOR)  # NaN fails the test: the top
    k = k if k > F32(_LOWEST_LEVEL) else F32(_LOWEST_LEVEL)
    below = _LEVEL_BELOW[np.int64(k) - _LOWEST_LEVEL]
    return below if value - _LEVELS[below] < _LEVELS[below + 1] - value else below + 1


@njit(cache=True)
def _block_weights(block, block_imatrix, sigma2, weight):
    """Importance of each element in the scale search: x², or imatrix · sqrt(σ² + x²)."""
    if block_imatrix.size:
        for j in range(block.size):
            weight[j] = block_imatrix[j] * np.sqrt(sigma2 + block[j] * block[j])
    else:
        for j in range(block.size):
            weight[j] = block[j] * block[j]


@njit(cache=True)
def _weighted_sums(block, weight, inverse_scale, level):
    """Σ w·q·x and Σ w·q² when every element takes the level nearest to x·inverse_scale.

    The levels are found in a pass of their own, which vectorizes; the sums keep ggml's order.
    """
    for j in range(block.size):
        level[j] = _LEVELS[_nearest_level(inverse_scale * block[j])]
    sumqx = ZERO
    sumq2 = ZERO
    for j in range(block.size):
        w = weight[j]
        sumqx += w * level[j] * block[j]
        sumq2 += w * level[j] * level[j]
    return sumqx, sumq2


@njit(cache=True)
def _block_scale(block, weight, level):
    """Scale of one block: the least-squares scale of the best of 16 level assignments.

    The first assignment maps the extreme element to the most negative level;
    the others scale it to levels[0] + t for t in −7..7. Each candidate's
    least-squares scale d = Σwqx/Σwq² is kept if it lowers the error, i.e.
    raises (Σwqx)²/Σwq².
    """
    max_value, amax = signed_max(block)
    if amax < GROUP_MAX_EPS:
        return ZERO
    sumqx, sumq2 = _weighted_sums(block, weight, ONE / (-max_value / _LEVELS[0]), level)
    d = sumqx / sumq2 if sumq2 > ZERO else ZERO
    best = d * sumqx
    for step in range(-_NTRY, _NTRY + 1):
        inverse_scale = F32(step + _LOWEST_LEVEL) / max_value
        sumqx, sumq2 = _weighted_sums(block, weight, inverse_scale, level)
        if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(cache=True)
def _store_block_multipliers(scales, out, offset):
    """IQ4_XS: one fp16 scale d for the super-block and a 6-bit multiplier l per block.

    d = −(block scale of largest magnitude)/32, so that scale maps to
    multiplier −32 exactly. Writes d, scales_h and scales_l, and replaces each
    block scale by d·l, the scale its levels are then chosen for (computed
    from the float32 d, as ggml does, not from the stored fp16).
    """
    largest, _ = signed_max(scales)
    d = -largest / F32(XS_SCALE_BIAS)
    inverse_d = inverse_or_zero(d)
    multipliers = np.empty(scales.size, dtype=np.int64)
    for ib in range(scales.size):
        multipliers[ib] = max(-XS_SCALE_BIAS, min(XS_SCALE_BIAS - 1, nearest_int(inverse_d * scales[ib])))
        scales[ib] = d * F32(multipliers[ib])
    store_xs_scales(d, multipliers, out, offset)


@njit(cache=True)
def store_xs_scales(d, multipliers, out, offset):
    """IQ4_XS's fp16 d, then the block multipliers (−32..31) as 6-bit fields: low nibbles in scales_l
    (two per byte), the top two bits in scales_h."""
    store_fp16(out, offset, d)
    scales_h = 0
    for ib in range(multipliers.size):
        stored = multipliers[ib] + XS_SCALE_BIAS
        scales_h |= (stored >> 4) << (2 * ib)
        low_nibble = stored & 0x0F
        if ib % 2 == 0:
            out[offset + _XS_SCALES_L + ib // 2] = np.uint8(low_nibble)
        else:
            out[offset + _XS_SCALES_L + ib // 2] |= np.uint8(low_nibble << 4)
    store_u16(out, offset + _XS_SCALES_H, scales_h)


@njit(cache=True)
def store_levels(block, scale, out, offset):
    """The nearest level of every x/scale, packed two per byte: element j low, j+16 high."""
    inverse_scale = inverse_or_zero(scale)
    for j in range(HALF_BLOCK):
        low = _nearest_level(inverse_scale * block[j])
        high = _nearest_level(inverse_scale * block[j + HALF_BLOCK])
        out[offset + j] = np.uint8(low | (high << 4))


@njit(cache=True)
def _quantize_super_block(x, imatrix, out, offset, scales, weight, level):
    """ggml's quantize_row_iq4_nl_impl for one super-block (one IQ4_NL block, or one IQ4_XS block).

    σ² = 2·mean(x²) over the super-block enters the imatrix weights. A
    super-block of a single block stores its scale directly (IQ4_NL);
    larger ones share a scale (IQ4_XS).
    """
    n_blocks = x.size // BLOCK
    sigma2 = sum_of_squares(x) * (F32(2) / F32(x.size)) if imatrix.size else ZERO
    for ib in range(n_blocks):
        start = ib * BLOCK
        block = x[start:start + BLOCK]
        _block_weights(block, imatrix[start:start + BLOCK], sigma2, weight)
        scales[ib] = _block_scale(block, weight, level)
    if n_blocks > 1:
        _store_block_multipliers(scales, out, offset)
        levels_offset = offset + XS_QS
    else:
        store_fp16(out, offset, scales[0])
        levels_offset = offset + _NL_QS
    for ib in range(n_blocks):
        start = ib * BLOCK
        store_levels(x[start:start + BLOCK], scales[ib], out, levels_offset + ib * HALF_BLOCK)


@njit(cache=True)
def _quantize_iq4_row(x, imatrix, out, super_block, block_bytes):
    """Both types' row kernel: the scratch is allocated once per row, not per super-block."""
    scales = np.empty(super_block // BLOCK, dtype=np.float32)
    weight = np.empty(BLOCK, dtype=np.float32)
    level = np.empty(BLOCK, dtype=np.float32)
    for sb in range(x.size // super_block):
        start = sb * super_block
        _quantize_super_block(
            x[start:start + super_block],
            imatrix[start:start + super_block],
            out,
            sb * block_bytes,
            scales,
            weight,
            level,
        )


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq4_nl(x, imatrix, out):
    _quantize_iq4_row(x, imatrix, out, BLOCK, _NL_BYTES)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq4_xs(x, imatrix, out):
    _quantize_iq4_row(x, imatrix, out, SUPER_BLOCK, _XS_BYTES)


@njit(cache=True)
def _dequantize_block(q, offset, scale, out, out_offset):
    for j in range(HALF_BLOCK):
        byte = np.int64(q[offset + j])
        out[out_offset + j] = scale * _LEVELS[byte & 0x0F]
        out[out_offset + j + HALF_BLOCK] = scale * _LEVELS[byte >> 4]


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_iq4_nl(q, out):
    for block in range(out.size // BLOCK):
        offset = block * _NL_BYTES
        _dequantize_block(q, offset + _NL_QS, load_fp16(q, offset), out, block * BLOCK)


@njit(cache=True)
def _block_multiplier(q, offset, ib):
    """The 6-bit scale of block ib of an IQ4_XS super-block, centred on zero."""
    low = (np.int64(q[offset + _XS_SCALES_L + ib // 2]) >> (4 * (ib % 2))) & 0x0F
    high = (np.int64(load_u16(q, offset + _XS_SCALES_H)) >> (2 * ib)) & 3
    return (low | (high << 4)) - XS_SCALE_BIAS


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_iq4_xs(q, out):
    for sb in range(out.size // SUPER_BLOCK):
        offset = sb * _XS_BYTES
        d = load_fp16(q, offset)
        for ib in range(SUPER_BLOCK // BLOCK):
            scale = d * F32(_block_multiplier(q, offset, ib))
            out_offset = sb * SUPER_BLOCK + ib * BLOCK
            _dequantize_block(q, offset + XS_QS + ib * HALF_BLOCK, scale, out, out_offset)


KERNELS = {
    GGMLQuantizationType.IQ4_NL: (quantize_row_iq4_nl, dequantize_row_iq4_nl),
    GGMLQuantizationType.IQ4_XS: (quantize_row_iq4_xs, dequantize_row_iq4_xs),
}
