"""1-bit lattice quantizers: IQ1_S (1.5625 bits per weight) and IQ1_M (1.75), super-blocks of 256.

Every group of 8 weights becomes one point of ggml's 2048-point grid whose coordinates are −1, 0 or 1,
shifted by ±IQ1S_DELTA (1/8) and multiplied by a block scale. The block scale comes from ggml's exact
search: with three levels per element, sorting the block's values lets every split into (low, middle,
high) be scored from prefix sums, for both signs of the shift (IQ1_S, blocks of 32) or for each
combination of the two groups' shifts (IQ1_M, blocks of 16). Groups that land off the grid take the
neighbour (from `iq2_grids`) of least weighted error, and the scale is then refitted. The block scales
become 3-bit multipliers 2l+1 of one fp16 super-block scale: IQ1_S stores max/15 · 1.125 as is, IQ1_M
refits it by least squares over the whole super-block, times 1.1125, and spreads its 16 bits over the
top nibbles of the four scale words. The kernels follow `quantize_row_iq1_s_impl` and
`quantize_row_iq1_m_impl` operation for operation, quirks included. ggml requires an imatrix for IQ1_S
(an empty one raises ValueError here) but not for IQ1_M, which then weighs each element by x².
Byte layouts are ggml's `block_iq1_s` and `block_iq1_m`.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.iq2_grids import GROUP, iq2_tables
from bpwopt.quant.kernels.numerics import (
    F32,
    FLOAT_MAX,
    ONE,
    ZERO,
    fp16_bits_to_fp32,
    fp32_to_fp16_bits,
    load_fp16,
    load_u16,
    odd_multiplier_level,
    store_fp16,
    store_u16,
)
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW
from bpwopt.quant.tables import grid_table

SUPER_BLOCK, _S_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ1_S]
_M_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ1_M][1]
_S_BLOCK = 32  # IQ1S_BLOCK_SIZE: elements per IQ1_S block scale
_M_BLOCK = 16  # IQ1M_BLOCK_SIZE
_S_BLOCKS = SUPER_BLOCK // _S_BLOCK
_M_BLOCKS = SUPER_BLOCK // _M_BLOCK
DELTA = F32(0.125)  # IQ1S_DELTA and IQ1M_DELTA
# The three levels times the block scale, for a shift of +delta and of −delta.
_PLUS = np.array([F32(-1) + DELTA, DELTA, ONE + DELTA], dtype=np.float32)
_MINUS = np.array([F32(-1) - DELTA, -DELTA, ONE - DELTA], dtype=np.float32)
_S_MAX_EPS = F32(1e-12)  # GROUP_MAX_EPS_IQ1_S
_M_MAX_EPS = F32(1e-7)  # GROUP_MAX_EPS_IQ1_M
_MULTIPLIER_STEPS = F32(15)  # d = largest block scale / 15: multipliers 2l+1, l in 0..7
_MAX_MULTIPLIER = 7
_S_FUDGE = F32(1.125)  # ggml: "another fudge factor. Don't ask me why it is needed."
_M_FUDGE = F32(1.1125)
_SHIFT_BIT = 8  # IQ1_S: bit 3 of the 4-bit scale field flags the −delta shift
# IQ1_M: the shift bit of each of a block's two groups (bit 3 / bit 7 of its qh byte), by sign combination
# k = 2·(first group minus) + (second group minus), ggml's `masks`.
_M_SHIFT_MASKS = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.int64)

# block_iq1_s: fp16 d, qs[32] low 8 bits of the grid indices, qh uint16[8] per block of 32:
# 3 high index bits per group, then the 3-bit multiplier at bit 12 and the shift sign at bit 15.
_S_QS = 2
_S_QH = _S_QS + SUPER_BLOCK // 8
# block_iq1_m: qs[32], qh[16] (per group of 8: 3 high index bits and a shift bit, two groups a byte),
# scales: 4 uint16, each four 3-bit multipliers and a nibble of the fp16 super-block scale.
_M_QH = SUPER_BLOCK // 8
_M_SCALES = _M_QH + SUPER_BLOCK // 16


def _search_tables():
    """(each grid point's levels 0..2 as uint8 (2048, 8), kmap int32, neighbour lists uint16).

    The quantizers only form points whose 8 levels are all 0..2 (3**8 of the 43692 map entries), so
    only those points' neighbour lists are kept, in ggml's order and format (count, then indices), and
    the map is pointed at them: 0.66 MB instead of 2.75 MB, under Numba's 1 MB limit for arrays it
    freezes into (cacheable) compiled code. The unreachable off-grid entries point at the first list.
    """
    grid, kmap, neighbours = iq2_tables(2048)
    positions = grid.view(np.int8).reshape(-1, GROUP).astype(np.int64)  # 2l+1
    kept_map = kmap.copy()
    points = np.arange(kmap.size)
    reachable = np.all(((points[:, None] >> (2 * np.arange(GROUP))) & 3) <= 2, axis=1)
    lists = []
    kept_size = 0
    for point in np.flatnonzero(reachable & (kmap < 0)):
        offset = -int(kmap[point]) - 1
        entries = neighbours[offset : offset + 1 + int(neighbours[offset])]
        kept_map[point] = -(kept_size + 1)
        lists.append(entries)
        kept_size += entries.size
    kept_map[~reachable & (kmap < 0)] = -1
    return ((positions - 1) // 2).astype(np.uint8), kept_map, np.concatenate(lists).astype(np.uint16)


_LEVELS, _KMAP, _NEIGHBOURS = _search_tables()
# The decoders read ggml-common.h's grid: every byte −1, 0 or 1.
_GRID_VALUES = grid_table("iq1s_grid").view(np.int8).reshape(-1, GROUP).astype(np.float32)


@njit(cache=True)
def _sort_order(xb, order):
    """The indices of xb in ascending order of value; equal values keep their index order.

    ggml sorts (value, index) pairs with qsort and a comparator that calls equal values equal, so ties
    are ordered by qsort's implementation. glibc's qsort is a merge sort for arrays this small (up to
    1 KiB of elements), which is stable: ties come out in index order, as here.
    """
    for j in range(xb.size):
        value = xb[j]
        i = j
        while i > 0 and xb[order[i - 1]] > value:
            order[i] = order[i - 1]
            i -= 1
        order[i] = j


@njit(cache=True)
def _block_max(xb):
    largest = abs(xb[0])
    for i in range(1, xb.size):
        magnitude = abs(xb[i])
        largest = largest if largest > magnitude else magnitude
    return largest


@njit(cache=True)
def _super_block_weights(xbl, imatrix, weight):
    """imatrix · sqrt(σ² + x²) with σ² = 2·mean(x²) over the super-block, or x² without an imatrix."""
    if imatrix.size:
        sumx2 = ZERO
        for i in range(SUPER_BLOCK):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = F32(2) * sumx2 / F32(SUPER_BLOCK)
        for i in range(SUPER_BLOCK):
            weight[i] = imatrix[i] * np.sqrt(sigma2 + xbl[i] * xbl[i])
    else:
        for i in range(SUPER_BLOCK):
            weight[i] = xbl[i] * xbl[i]


@njit(cache=True)
def _assign_levels(order, first_middle, first_high, L):
    """Levels 0, 1, 2 to the sorted elements before first_middle, before first_high, and the rest."""
    for j in range(order.size):
        if j < first_middle:
            L[order[j]] = 0
        elif j < first_high:
            L[order[j]] = 1
        else:
            L[order[j]] = 2


@njit(cache=True)
def _best_neighbour(offset, xb, weight, start, scale, values, L, terms):
    """ggml's iq1_find_best_neighbour2: of the grid points listed at _NEIGHBOURS[offset], the one of
    least Σ w·(scale·values[l] − x)² over the group at start; its levels go to L.

    Each element's term w·diff·diff can take only three values, one per level: they are computed
    once (terms, float32 (8, 3)), each as ggml computes it, and every candidate's sum adds them up in
    ggml's order. Where no candidate's error is below FLT_MAX (inf or NaN: |x| so large that the
    float32 sums overflow), ggml scans the whole grid reading x out of bounds (it indexes x by the grid
    index) and would abort if that found nothing either; here the first, nearest neighbour is taken.
    """
    for i in range(GROUP):
        for level in range(3):
            diff = scale * values[level] - xb[start + i]
            terms[i, level] = weight[start + i] * diff * diff
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


@njit(cache=True)
def _snap_group(xb, weight, start, scale, values, L, terms):
    """The grid index of the group's levels L[start:start+8]; an off-grid group takes its best neighbour
    (L updated). Returns (grid index, whether the levels were on the grid)."""
    point = 0
    for j in range(GROUP):
        point |= L[start + j] << (2 * j)
    grid_index = np.int64(_KMAP[point])
    if grid_index >= 0:
        return grid_index, True
    return _best_neighbour(-grid_index - 1, xb, weight, start, scale, values, L, terms), False


@njit(cache=True)
def _group_sums(xb, weight, start, grid_index, values, multiplier, sumqx, sumq2):
    """sumqx + Σ w·q·x and sumq2 + Σ w·q² over one group coded as grid_index, q = values[l]·multiplier."""
    for j in range(GROUP):
        w = weight[start + j]
        q = values[_LEVELS[grid_index, j]] * multiplier
        sumqx += w * q * xb[start + j]
        sumq2 += w * q * q
    return sumqx, sumq2


# ---------------------------------------------------------------- IQ1_S


@njit(cache=True, error_model="numpy")
def _s_split(xb, weight, order, sumx, sumw, candidates):
    """The best split of the sorted block into levels (−1, 0, 1) + shift: (scale, i1, i2, shift).

    shift is +1 or −1 (the sign of delta); i1 < 0 where no split has Σw·q² > 0. For each i1, the
    Σ w·q·x and Σ w·q² of every i2 and both shifts are computed first, in one loop that vectorizes
    (each value as ggml computes it, term by term), then scanned in ggml's order, since each
    comparison depends on the best score so far.
    """
    p0, p1, p2 = _PLUS[0], _PLUS[1], _PLUS[2]
    m0, m1, m2 = _MINUS[0], _MINUS[1], _MINUS[2]
    n = _S_BLOCK
    sumx[0] = ZERO
    sumw[0] = ZERO
    for j in range(n):
        i = order[j]
        sumx[j + 1] = sumx[j] + weight[i] * xb[i]
        sumw[j + 1] = sumw[j] + weight[i]
    qx_plus, q2_plus, qx_minus, q2_minus = candidates[0], candidates[1], candidates[2], candidates[3]
    best_score = -FLOAT_MAX
    scale = ZERO
    best_i1 = -1
    best_i2 = -1
    best_shift = 0
    for i1 in range(n + 1):
        low_x = sumx[i1] - sumx[0]
        low_w = sumw[i1] - sumw[0]
        low_qx_plus = low_x * p0
        low_qx_minus = low_x * m0
        low_q2_plus = low_w * p0 * p0
        low_q2_minus = low_w * m0 * m0
        for i2 in range(i1, n + 1):
            middle_x = sumx[i2] - sumx[i1]
            high_x = sumx[n] - sumx[i2]
            middle_w = sumw[i2] - sumw[i1]
            high_w = sumw[n] - sumw[i2]
            qx_plus[i2] = low_qx_plus + middle_x * p1 + high_x * p2
            q2_plus[i2] = low_q2_plus + middle_w * p1 * p1 + high_w * p2 * p2
            qx_minus[i2] = low_qx_minus + middle_x * m1 + high_x * m2
            q2_minus[i2] = low_q2_minus + middle_w * m1 * m1 + high_w * m2 * m2
        for i2 in range(i1, n + 1):
            sumqx = qx_plus[i2]
            sumq2 = q2_plus[i2]
            if sumq2 > ZERO and sumqx * sumqx > best_score * sumq2:
                scale = sumqx / sumq2
                best_score = scale * sumqx
                best_i1 = i1
                best_i2 = i2
                best_shift = 1
            sumqx = qx_minus[i2]
            sumq2 = q2_minus[i2]
            if sumq2 > ZERO and sumqx * sumqx > best_score * sumq2:
                scale = sumqx / sumq2
                best_score = scale * sumqx
                best_i1 = i1
                best_i2 = i2
                best_shift = -1
    return scale, best_i1, best_i2, best_shift


@njit(cache=True, error_model="numpy")
def _quantize_s_super_block(xbl, imatrix, out, offset, scratch):
    weight, scales, shifts, order, L, index, sumx, sumw, candidates, terms = scratch
    out[offset : offset + _S_BYTES] = 0
    _super_block_weights(xbl, imatrix, weight)
    max_scale = ZERO
    for ib in range(_S_BLOCKS):
        start = ib * _S_BLOCK
        xb = xbl[start : start + _S_BLOCK]
        wb = weight[start : start + _S_BLOCK]
        scales[ib] = ZERO
        shifts[ib] = 1
        if _block_max(xb) < _S_MAX_EPS:
            continue
        _sort_order(xb, order)
        scale, i1, i2, shift = _s_split(xb, wb, order, sumx, sumw, candidates)
        if i1 < 0:
            continue
        _assign_levels(order, i1, i2, L)
        if scale < ZERO:
            for j in range(_S_BLOCK):
                L[j] = 2 - L[j]
            scale = -scale
            shift = -shift
        values = _PLUS if shift == 1 else _MINUS
        all_on_grid = True
        for k in range(_S_BLOCK // GROUP):
            index[k], on_grid = _snap_group(xb, wb, GROUP * k, scale, values, L, terms)
            all_on_grid &= on_grid
        if not all_on_grid:
            sumqx = ZERO
            sumq2 = ZERO
            for k in range(_S_BLOCK // GROUP):
                sumqx, sumq2 = _group_sums(xb, wb, GROUP * k, index[k], values, ONE, sumqx, sumq2)
            if sumqx > ZERO and sumq2 > ZERO:
                scale = sumqx / sumq2
        high_bits = 0
        for k in range(_S_BLOCK // GROUP):
            out[offset + _S_QS + (_S_BLOCK // GROUP) * ib + k] = np.uint8(index[k] & 255)
            high_bits |= (index[k] >> 8) << (3 * k)
        store_u16(out, offset + _S_QH + 2 * ib, high_bits)
        scales[ib] = scale
        shifts[ib] = shift
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == ZERO:
        return
    d = max_scale / _MULTIPLIER_STEPS
    store_fp16(out, offset, d * _S_FUDGE)
    inverse_d = ONE / d
    for ib in range(_S_BLOCKS):
        level = odd_multiplier_level(inverse_d, scales[ib], _MAX_MULTIPLIER)
        if shifts[ib] == -1:
            level |= _SHIFT_BIT
        at = offset + _S_QH + 2 * ib
        store_u16(out, at, np.int64(load_u16(out, at)) | (level << 12))


@njit(cache=True)
def _s_scratch():
    return (
        np.empty(SUPER_BLOCK, dtype=np.float32),  # weight
        np.empty(_S_BLOCKS, dtype=np.float32),  # scales
        np.empty(_S_BLOCKS, dtype=np.int64),  # shifts
        np.empty(_S_BLOCK, dtype=np.int64),  # order
        np.empty(_S_BLOCK, dtype=np.int64),  # L
        np.empty(_S_BLOCK // GROUP, dtype=np.int64),  # index
        np.empty(_S_BLOCK + 1, dtype=np.float32),  # sumx
        np.empty(_S_BLOCK + 1, dtype=np.float32),  # sumw
        np.empty((4, _S_BLOCK + 1), dtype=np.float32),  # Σw·q·x and Σw·q² of each split, both shifts
        np.empty((GROUP, 3), dtype=np.float32),  # the neighbour search's error terms
    )


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq1_s(x, imatrix, out):
    """ggml's quantize_row_iq1_s_impl on one row; the imatrix is required, as in ggml."""
    if imatrix.size == 0:
        raise ValueError("IQ1_S needs an importance matrix")
    scratch = _s_scratch()
    for sb in range(x.size // SUPER_BLOCK):
        start = sb * SUPER_BLOCK
        super_block = x[start : start + SUPER_BLOCK]
        _quantize_s_super_block(super_block, imatrix[start : start + SUPER_BLOCK], out, sb * _S_BYTES, scratch)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_iq1_s(q, out):
    for sb in range(out.size // SUPER_BLOCK):
        offset = sb * _S_BYTES
        d = load_fp16(q, offset)
        for ib in range(_S_BLOCKS):
            high_bits = np.int64(load_u16(q, offset + _S_QH + 2 * ib))
            dl = d * F32(2 * ((high_bits >> 12) & 7) + 1)
            delta = -DELTA if high_bits & 0x8000 else DELTA
            for k in range(_S_BLOCK // GROUP):
                grid_index = np.int64(q[offset + _S_QS + 4 * ib + k]) | (((high_bits >> (3 * k)) & 7) << 8)
                at = sb * SUPER_BLOCK + ib * _S_BLOCK + GROUP * k
                for j in range(GROUP):
                    out[at + j] = dl * (_GRID_VALUES[grid_index, j] + delta)


# ---------------------------------------------------------------- IQ1_M


@njit(cache=True, error_model="numpy")
def _m_split(xb, weight, order, prefix_x, prefix_w):
    """The best split of the sorted block into levels and a shift sign per group of 8:
    (scale, i1, i2, k), k = 2·(first group −delta) + (second group −delta); i1 < 0 where none has
    Σw·q² > 0.

    ggml keeps the prefix sums per group, since each group can shift its own way; with the levels one
    apart, a split's Σ w·q·x collapses to T·v[2] − S[i1] − S[i2] and Σ w·q² to similar terms.
    """
    n = _M_BLOCK
    half = n // 2
    for h in range(2):
        prefix_x[h, 0] = ZERO
        prefix_w[h, 0] = ZERO
    for j in range(n):
        i = order[j]
        h = 0 if i < half else 1
        prefix_x[h, j + 1] = prefix_x[h, j] + weight[i] * xb[i]
        prefix_x[1 - h, j + 1] = prefix_x[1 - h, j]
        prefix_w[h, j + 1] = prefix_w[h, j] + weight[i]
        prefix_w[1 - h, j + 1] = prefix_w[1 - h, j]
    p2 = _PLUS[2]
    m2 = _MINUS[2]
    cp1 = _PLUS[0] * _PLUS[0] - _PLUS[1] * _PLUS[1]
    cp2 = _PLUS[1] * _PLUS[1] - _PLUS[2] * _PLUS[2]
    cm1 = _MINUS[0] * _MINUS[0] - _MINUS[1] * _MINUS[1]
    cm2 = _MINUS[1] * _MINUS[1] - _MINUS[2] * _MINUS[2]
    total_x0 = prefix_x[0, n]
    total_x1 = prefix_x[1, n]
    total_qx_p0 = total_x0 * p2
    total_qx_m0 = total_x0 * m2
    total_qx_p1 = total_x1 * p2
    total_qx_m1 = total_x1 * m2
    total_q2_p0 = prefix_w[0, n] * p2 * p2
    total_q2_m0 = prefix_w[0, n] * m2 * m2
    total_q2_p1 = prefix_w[1, n] * p2 * p2
    total_q2_m1 = prefix_w[1, n] * m2 * m2
    best_score = -FLOAT_MAX
    scale = ZERO
    best_i1 = -1
    best_i2 = -1
    best_k = -1
    for i1 in range(n + 1):
        for i2 in range(i1, n + 1):
            sx0 = prefix_x[0, i1] + prefix_x[0, i2]
            sx1 = prefix_x[1, i1] + prefix_x[1, i2]
            qx_p0 = total_qx_p0 - sx0
            qx_m0 = total_qx_m0 - sx0
            qx_p1 = total_qx_p1 - sx1
            qx_m1 = total_qx_m1 - sx1
            q2_p0 = total_q2_p0 + prefix_w[0, i1] * cp1 + prefix_w[0, i2] * cp2
            q2_m0 = total_q2_m0 + prefix_w[0, i1] * cm1 + prefix_w[0, i2] * cm2
            q2_p1 = total_q2_p1 + prefix_w[1, i1] * cp1 + prefix_w[1, i2] * cp2
            q2_m1 = total_q2_m1 + prefix_w[1, i1] * cm1 + prefix_w[1, i2] * cm2
            for k in range(4):
                if k == 0:
                    sumqx = qx_p0 + qx_p1
                    sumq2 = q2_p0 + q2_p1
                elif k == 1:
                    sumqx = qx_p0 + qx_m1
                    sumq2 = q2_p0 + q2_m1
                elif k == 2:
                    sumqx = qx_m0 + qx_p1
                    sumq2 = q2_m0 + q2_p1
                else:
                    sumqx = qx_m0 + qx_m1
                    sumq2 = q2_m0 + q2_m1
                if sumq2 > ZERO and sumqx * sumqx > best_score * sumq2:
                    scale = sumqx / sumq2
                    best_score = scale * sumqx
                    best_i1 = i1
                    best_i2 = i2
                    best_k = k
    return scale, best_i1, best_i2, best_k


@njit(cache=True)
def _m_group_values(shift_k, k):
    """The shifted levels of group k (0 or 1) under sign combination shift_k."""
    minus = shift_k >= 2 if k == 0 else shift_k % 2 == 1
    return _MINUS if minus else _PLUS


@njit(cache=True, error_model="numpy")
def _quantize_m_super_block(xbl, imatrix, out, offset, scratch):
    weight, scales, shifts, order, L, index, prefix_x, prefix_w, terms = scratch
    out[offset : offset + _M_BYTES] = 0
    _super_block_weights(xbl, imatrix, weight)
    max_scale = ZERO
    for ib in range(_M_BLOCKS):
        start = ib * _M_BLOCK
        xb = xbl[start : start + _M_BLOCK]
        wb = weight[start : start + _M_BLOCK]
        scales[ib] = ZERO
        shifts[ib] = 0
        if _block_max(xb) < _M_MAX_EPS:
            continue
        _sort_order(xb, order)
        scale, i1, i2, shift_k = _m_split(xb, wb, order, prefix_x, prefix_w)
        if i1 < 0:
            continue
        _assign_levels(order, i1, i2, L)
        if scale < ZERO:
            for j in range(_M_BLOCK):
                L[j] = 2 - L[j]
            scale = -scale
            shift_k = 3 - shift_k  # both groups' shifts flip
        all_on_grid = True
        for k in range(_M_BLOCK // GROUP):
            index[k], on_grid = _snap_group(xb, wb, GROUP * k, scale, _m_group_values(shift_k, k), L, terms)
            all_on_grid &= on_grid
        if not all_on_grid:
            sumqx = ZERO
            sumq2 = ZERO
            for k in range(_M_BLOCK // GROUP):
                values = _m_group_values(shift_k, k)
                sumqx, sumq2 = _group_sums(xb, wb, GROUP * k, index[k], values, ONE, sumqx, sumq2)
            if sumqx > ZERO and sumq2 > ZERO:
                scale = sumqx / sumq2
        out[offset + 2 * ib] = np.uint8(index[0] & 255)
        out[offset + 2 * ib + 1] = np.uint8(index[1] & 255)
        out[offset + _M_QH + ib] = np.uint8((index[0] >> 8) | ((index[1] >> 8) << 4))
        scales[ib] = scale
        shifts[ib] = shift_k
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == ZERO:
        return
    # The super-block scale is refitted by least squares over every block, each at its multiplier 2l+1
    # and with the grid points as stored (index 0 for the blocks left uncoded).
    d = max_scale / _MULTIPLIER_STEPS
    inverse_d = ONE / d
    scale_words = np.zeros(4, dtype=np.int64)
    sumqx = ZERO
    sumq2 = ZERO
    for ib in range(_M_BLOCKS):
        level = odd_multiplier_level(inverse_d, scales[ib], _MAX_MULTIPLIER)
        scale_words[ib // 4] |= level << (3 * (ib % 4))
        high_bits = np.int64(out[offset + _M_QH + ib]) | _M_SHIFT_MASKS[shifts[ib]]
        out[offset + _M_QH + ib] = np.uint8(high_bits)
        multiplier = F32(2 * level + 1)
        start = ib * _M_BLOCK
        for k in range(_M_BLOCK // GROUP):
            grid_index = np.int64(out[offset + 2 * ib + k]) | ((high_bits << (8 - 4 * k)) & 0x700)
            values = _m_group_values(shifts[ib], k)
            sumqx, sumq2 = _group_sums(xbl, weight, start + GROUP * k, grid_index, values, multiplier, sumqx, sumq2)
    if sumq2 > ZERO:
        d = sumqx / sumq2
    d_bits = np.int64(fp32_to_fp16_bits(d * _M_FUDGE))
    scale_words[0] |= (d_bits & 0x000F) << 12
    scale_words[1] |= (d_bits & 0x00F0) << 8
    scale_words[2] |= (d_bits & 0x0F00) << 4
    scale_words[3] |= d_bits & 0xF000
    for word in range(4):
        store_u16(out, offset + _M_SCALES + 2 * word, scale_words[word])


@njit(cache=True)
def _m_scratch():
    return (
        np.empty(SUPER_BLOCK, dtype=np.float32),  # weight
        np.empty(_M_BLOCKS, dtype=np.float32),  # scales
        np.empty(_M_BLOCKS, dtype=np.int64),  # shifts: the sign combination k of each block
        np.empty(_M_BLOCK, dtype=np.int64),  # order
        np.empty(_M_BLOCK, dtype=np.int64),  # L
        np.empty(_M_BLOCK // GROUP, dtype=np.int64),  # index
        np.empty((2, _M_BLOCK + 1), dtype=np.float32),  # prefix sums of w·x per group
        np.empty((2, _M_BLOCK + 1), dtype=np.float32),  # prefix sums of w per group
        np.empty((GROUP, 3), dtype=np.float32),  # the neighbour search's error terms
    )


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq1_m(x, imatrix, out):
    """ggml's quantize_row_iq1_m_impl on one row; an empty imatrix is ggml's NULL (weights x²)."""
    scratch = _m_scratch()
    for sb in range(x.size // SUPER_BLOCK):
        start = sb * SUPER_BLOCK
        super_block_imatrix = imatrix[start : start + SUPER_BLOCK] if imatrix.size else imatrix
        _quantize_m_super_block(x[start : start + SUPER_BLOCK], super_block_imatrix, out, sb * _M_BYTES, scratch)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_iq1_m(q, out):
    words = np.empty(4, dtype=np.int64)
    for sb in range(out.size // SUPER_BLOCK):
        offset = sb * _M_BYTES
        for word in range(4):
            words[word] = np.int64(load_u16(q, offset + _M_SCALES + 2 * word))
        d_bits = (words[0] >> 12) | ((words[1] >> 8) & 0x00F0) | ((words[2] >> 4) & 0x0F00) | (words[3] & 0xF000)
        d = fp16_bits_to_fp32(d_bits)
        for ib in range(SUPER_BLOCK // 32):
            word = words[ib // 2]
            dl = (d * F32(2 * ((word >> (6 * (ib % 2))) & 7) + 1), d * F32(2 * ((word >> (6 * (ib % 2) + 3)) & 7) + 1))
            for g in range(4):
                high_bits = np.int64(q[offset + _M_QH + 2 * ib + g // 2]) >> (4 * (g % 2))
                grid_index = np.int64(q[offset + 4 * ib + g]) | ((high_bits & 7) << 8)
                delta = -DELTA if high_bits & 0x08 else DELTA
                at = sb * SUPER_BLOCK + ib * 32 + GROUP * g
                for j in range(GROUP):
                    out[at + j] = dl[g // 2] * (_GRID_VALUES[grid_index, j] + delta)


KERNELS = {
    GGMLQuantizationType.IQ1_S: (quantize_row_iq1_s, dequantize_row_iq1_s),
    GGMLQuantizationType.IQ1_M: (quantize_row_iq1_m, dequantize_row_iq1_m),
}
