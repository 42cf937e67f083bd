"""2-bit lattice quantizer with free signs: IQ2_S (2.5625 bits per weight), super-blocks of 256.

Every group of 8 magnitudes becomes one point of ggml's 1024-point grid (coordinates 1, 3 or 5 times
a block scale), stored as a 10-bit index, with all 8 signs kept as a byte. The scale of each block of
16 comes from ggml's `quantize_row_iq2_s_impl` search: 19 trial scales around max/5 round the
magnitudes to levels, an off-grid group takes the neighbour (from `iq2_grids`) of least weighted
error, and the least-squares scale with the largest (Σwqx)²/Σwq² wins; off-grid groups are then
re-snapped at that scale and the scale refitted. The block scales become 4-bit multipliers 2l+1 of
one fp16 super-block scale (max/31 · 0.9875). Weights are imatrix · sqrt(σ² + x²), or σ²/4 + x²
without an imatrix (ggml accepts both). Byte layout is ggml's `block_iq2_s`.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.iq2_grids import GROUP, iq2_tables
from bpwopt.quant.kernels.numerics import (
    F32,
    FLOAT_MAX,
    HALF,
    ONE,
    ZERO,
    load_fp16,
    nearest_int,
    odd_multiplier_level,
    store_fp16,
)
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW
from bpwopt.quant.tables import grid_table

SUPER_BLOCK, _BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_S]
BLOCK = 16  # elements per block scale: 2 groups
_BLOCKS = SUPER_BLOCK // BLOCK
_GROUPS = BLOCK // GROUP
_MAX_LEVEL = 2  # levels 0..2: grid coordinates 2l+1 = 1, 3, 5 (ggml's kMaxQ − 1)
_TOP_POSITION = F32(5)  # 2·kMaxQ − 1
_STEPS = 9  # trial scales max/(5 + 0.1·is), is in −9..9
_TENTH = F32(0.1)
_QUARTER = F32(0.25)
_MAX_EPS = F32(1e-8)  # GROUP_MAX_EPS_IQ2_S
_MULTIPLIER_STEPS = F32(31)  # d = largest block scale / 31: multipliers 2l+1, l in 0..15
_MAX_MULTIPLIER = 15
_FUDGE = F32(0.9875)

# block_iq2_s: fp16 d, qs[32] low 8 bits of the grid indices, signs[32] (one byte per group),
# qh[8] the indices' top 2 bits (four groups a byte), scales[8] (two 4-bit multipliers a byte).
_QS = 2
_SIGNS = _QS + SUPER_BLOCK // 8
_QH = _SIGNS + SUPER_BLOCK // 8
_SCALES = _QH + SUPER_BLOCK // 32


def _search_tables():
    """(each grid point's levels l (coordinates 2l+1) as uint8 (1024, 8), kmap int32, neighbours uint16)."""
    grid, kmap, neighbours = iq2_tables(1024)
    positions = grid.view(np.int8).reshape(-1, GROUP)
    return ((positions - 1) // 2).astype(np.uint8), kmap, neighbours


_LEVELS, _KMAP, _NEIGHBOURS = _search_tables()
# The decoder reads ggml-common.h's grid (bytes 8, 25, 43 for the coordinates 1, 3, 5), as ggml's does.
_GRID_VALUES = grid_table("iq2s_grid").view(np.uint8).reshape(-1, GROUP).astype(np.float32)
_SIGN_MASKS = grid_table("kmask_iq2xs").astype(np.int64)


@njit(cache=True)
def _best_neighbour(offset, xval, waux, start, scale, L, terms):
    """ggml's iq2_find_best_neighbour: of the grid points listed at _NEIGHBOURS[offset], the one of
    least Σ w·(scale·q − x)² over the group at start (w the square roots of the weights); its levels
    go to L.

    Each element's term w·diff·diff can take only three values, one per level: they are computed
    once (terms, float32 (8, 3)), each as ggml computes it, and every candidate's sum adds them up in
    ggml's order. Where no candidate's error is below FLT_MAX (inf or NaN: |x| so large that the
    float32 sums overflow), ggml aborts on an assertion; here the first, nearest neighbour is taken.
    """
    for i in range(GROUP):
        for level in range(_MAX_LEVEL + 1):
            diff = scale * F32(2 * level + 1) - xval[start + i]
            terms[i, level] = waux[start + i] * diff * diff
    count = np.int64(_NEIGHBOURS[offset])
    best_d2 = FLOAT_MAX
    grid_index = np.int64(_NEIGHBOURS[offset + 1])
    for j in range(1, count + 1):
        candidate = np.int64(_NEIGHBOURS[offset + j])
        d2 = ZERO
        for i in range(GROUP):
            d2 += terms[i, _LEVELS[candidate, i]]
        if d2 < best_d2:
            best_d2 = d2
            grid_index = candidate
    for i in range(GROUP):
        L[start + i] = _LEVELS[grid_index, i]
    return grid_index


@njit(cache=True, error_model="numpy")
def _round_group(xval, start, inverse_scale, L):
    """Levels nearest_int((x/scale − 1)/2), clamped to 0..2, of one group into L; returns its map index."""
    point = 0
    for i in range(GROUP):
        level = max(0, min(_MAX_LEVEL, nearest_int(HALF * (inverse_scale * xval[start + i] - ONE))))
        L[start + i] = level
        point |= level << (2 * i)
    return point


@njit(cache=True)
def _map_index(L, start):
    point = 0
    for i in range(GROUP):
        point |= L[start + i] << (2 * i)
    return point


@njit(cache=True)
def _weighted_sums(xval, weight, L):
    """Σ w·x·q and Σ w·q² for magnitudes q = 2l+1."""
    sumqx = ZERO
    sumq2 = ZERO
    for i in range(BLOCK):
        w = weight[i]
        q = F32(2 * L[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True, error_model="numpy")
def _block_scale(xval, weight, waux, max_value, L, Laux, on_grid, on_grid_aux, terms):
    """The scale search of one block; leaves the chosen levels in L (every group on the grid)."""
    L[:] = 0  # a block where no trial wins codes all levels 0, as ggml's memset leaves them
    best = ZERO
    scale = max_value / _TOP_POSITION
    on_grid[:] = True
    for step in range(-_STEPS, _STEPS + 1):
        inverse_scale = (_TOP_POSITION + F32(step) * _TENTH) / max_value
        this_scale = ONE / inverse_scale
        for k in range(_GROUPS):
            start = GROUP * k
            grid_index = _KMAP[_round_group(xval, start, inverse_scale, Laux)]
            on_grid_aux[k] = grid_index >= 0
            if grid_index < 0:
                _best_neighbour(-grid_index - 1, xval, waux, start, this_scale, Laux, terms)
        sumqx, sumq2 = _weighted_sums(xval, weight, Laux)
        if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
            on_grid[:] = on_grid_aux
    if (not on_grid[0] or not on_grid[1]) and scale > ZERO:
        inverse_scale = ONE / scale
        for k in range(_GROUPS):
            if on_grid[k]:
                continue
            start = GROUP * k
            grid_index = _KMAP[_round_group(xval, start, inverse_scale, L)]
            if grid_index < 0:
                _best_neighbour(-grid_index - 1, xval, waux, start, scale, L, terms)
        sumqx, sumq2 = _weighted_sums(xval, weight, L)
        if sumq2 > ZERO:
            scale = sumqx / sumq2
    return scale


@njit(cache=True, error_model="numpy")
def _quantize_super_block(xbl, imatrix, out, offset, scratch):
    scales, weight, waux, xval, L, Laux, on_grid, on_grid_aux, signs, terms = scratch
    out[offset : offset + _BYTES] = 0
    sumx2 = ZERO
    for i in range(SUPER_BLOCK):
        sumx2 += xbl[i] * xbl[i]
    sigma2 = F32(2) * sumx2 / F32(SUPER_BLOCK)
    max_scale = ZERO
    for ib in range(_BLOCKS):
        start = ib * BLOCK
        xb = xbl[start : start + BLOCK]
        if imatrix.size:
            for i in range(BLOCK):
                weight[i] = imatrix[start + i] * np.sqrt(sigma2 + xb[i] * xb[i])
        else:
            for i in range(BLOCK):
                weight[i] = _QUARTER * sigma2 + xb[i] * xb[i]
        for i in range(BLOCK):
            waux[i] = np.sqrt(weight[i])
        for k in range(_GROUPS):
            bits = 0
            for i in range(GROUP):
                value = xb[GROUP * k + i]
                if value >= ZERO:
                    xval[GROUP * k + i] = value
                else:
                    xval[GROUP * k + i] = -value
                    bits |= 1 << i
            signs[k] = bits
        max_value = xval[0]
        for i in range(1, BLOCK):
            max_value = max_value if max_value > xval[i] else xval[i]
        if max_value < _MAX_EPS:
            scales[ib] = ZERO
            continue
        scale = _block_scale(xval, weight, waux, max_value, L, Laux, on_grid, on_grid_aux, terms)
        if scale < ZERO:  # cannot happen (Σ w·x·q ≥ 0), kept as ggml has it
            scale = -scale
            for k in range(_GROUPS):
                signs[k] = ~signs[k] & 0xFF
        for k in range(_GROUPS):
            # Every group is on the grid by now (ggml aborts otherwise; the searches guarantee it).
            grid_index = np.int64(_KMAP[_map_index(L, GROUP * k)])
            i8 = 2 * ib + k
            out[offset + _QS + i8] = np.uint8(grid_index & 255)
            out[offset + _QH + i8 // 4] |= np.uint8((grid_index >> 8) << (2 * (i8 % 4)))
            out[offset + _SIGNS + i8] = np.uint8(signs[k])
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == ZERO:
        return
    d = max_scale / _MULTIPLIER_STEPS
    store_fp16(out, offset, d * _FUDGE)
    inverse_d = ONE / d
    for ib in range(_BLOCKS):
        level = odd_multiplier_level(inverse_d, scales[ib], _MAX_MULTIPLIER)
        if ib % 2 == 0:
            out[offset + _SCALES + ib // 2] = np.uint8(level)
        else:
            out[offset + _SCALES + ib // 2] |= np.uint8(level << 4)


@njit(cache=True)
def _row_scratch():
    return (
        np.empty(_BLOCKS, dtype=np.float32),  # scales
        np.empty(BLOCK, dtype=np.float32),  # weight
        np.empty(BLOCK, dtype=np.float32),  # waux: square roots of the weights
        np.empty(BLOCK, dtype=np.float32),  # xval: |x|
        np.zeros(BLOCK, dtype=np.int64),  # L
        np.zeros(BLOCK, dtype=np.int64),  # Laux
        np.empty(_GROUPS, dtype=np.bool_),  # on_grid
        np.empty(_GROUPS, dtype=np.bool_),  # on_grid_aux
        np.zeros(_GROUPS, dtype=np.int64),  # sign bits of each group
        np.empty((GROUP, _MAX_LEVEL + 1), dtype=np.float32),  # the neighbour search's error terms
    )


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq2_s(x, imatrix, out):
    """ggml's quantize_row_iq2_s_impl on one row; an empty imatrix is ggml's NULL."""
    scratch = _row_scratch()
    for sb in range(x.size // SUPER_BLOCK):
        start = sb * SUPER_BLOCK
        super_block_imatrix = imatrix[start : start + SUPER_BLOCK] if imatrix.size else imatrix
        _quantize_super_block(x[start : start + SUPER_BLOCK], super_block_imatrix, out, sb * _BYTES, scratch)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_iq2_s(q, out):
    for sb in range(out.size // SUPER_BLOCK):
        offset = sb * _BYTES
        d = load_fp16(q, offset)
        for ib in range(SUPER_BLOCK // 32):
            multipliers = np.int64(q[offset + _SCALES + ib])
            high_bits = np.int64(q[offset + _QH + ib])
            for g in range(4):
                dl = d * (HALF + F32((multipliers >> (4 * (g // 2))) & 0x0F)) * _QUARTER
                grid_index = np.int64(q[offset + _QS + 4 * ib + g]) | ((high_bits << (8 - 2 * g)) & 0x300)
                signs = np.int64(q[offset + _SIGNS + 4 * ib + g])
                at = sb * SUPER_BLOCK + 32 * ib + GROUP * g
                for j in range(GROUP):
                    value = dl * _GRID_VALUES[grid_index, j]
                    out[at + j] = -value if signs & _SIGN_MASKS[j] else value


KERNELS = {GGMLQuantizationType.IQ2_S: (quantize_row_iq2_s, dequantize_row_iq2_s)}
