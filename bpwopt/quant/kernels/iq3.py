"""3-bit i-quants on the D4-like grids: IQ3_XXS (3.0625 bpw) and IQ3_S (3.4375 bpw), super-blocks of 256.

Each block of 32 is coded as magnitudes and signs: the magnitudes go in groups
of 4 to one point of a fixed grid in {1,3,..,15}⁴ (256 points for IQ3_XXS, 512
for IQ3_S; see `iq3_grids`), times the block scale. The block scale comes from
ggml's search over 31 (IQ3_XXS) or 19 (IQ3_S) trial scales around max/15: each
trial rounds the magnitudes to levels, snaps off-grid groups to their best
neighbour (by weighted error) and keeps the least-squares scale with the least
error; groups left off the grid are then re-snapped at the chosen scale. The
eight block scales become 4-bit multipliers of one fp16 super-block scale.
IQ3_XXS keeps 7 sign bits per 8 elements (their parity is forced even by
flipping the least important element), IQ3_S all 8. Byte layouts are ggml's
`block_iq3_xxs` and `block_iq3_s`; the row kernels follow
`quantize_row_iq3_xxs_impl` and `quantize_row_iq3_s_impl` operation for
operation, quirks included (noted where they are).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.iq3_grids import grid_levels, iq3_tables
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

QK_K, _XXS_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ3_XXS]
_S_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ3_S][1]
BLOCK = 32
N_BLOCKS = QK_K // BLOCK
GROUPS = BLOCK // 4  # grid points per block
SIGN_BYTES = BLOCK // 8
MAX_LEVEL = 7  # levels 0..7 stand for magnitudes 2l+1
_TOP_MAGNITUDE = F32(2 * MAX_LEVEL + 1)
_STEP = F32(0.2)  # trial scales: max/(15 + step·0.2)
_XXS_STEPS = 15
_S_STEPS = 9
_XXS_MAX_EPS = F32(1e-8)  # ggml's GROUP_MAX_EPS_IQ3_XXS
_SCALE_LEVELS = 15  # block multipliers 2l+1, l in 0..15
_XXS_FUDGE = F32(1.0125)  # ggml's "small improvement via this fudge factor" on d
_S_FUDGE = F32(1.033)

# block_iq3_xxs: fp16 d, qs[64] grid indices, then 8 uint32: 4×7 sign bits | 4-bit scale << 28
_XXS_QS = 2
_XXS_SCALES_AND_SIGNS = _XXS_QS + QK_K // 4
# block_iq3_s: fp16 d, qs[64] low 8 bits of the grid indices, qh[8] their 9th bits, signs[32], scales[4]
_S_QS = 2
_S_QH = _S_QS + QK_K // 4
_S_SIGNS = _S_QH + QK_K // 32
_S_SCALES = _S_SIGNS + QK_K // 8


def _kernel_tables(grid_size: int):
    """The tables a kernel freezes in as constants: kmap, neighbours, and each grid point's four
    positions 2l+1 as float32 (what the neighbour search multiplies) and levels l as int64."""
    _, kmap, neighbours = iq3_tables(grid_size)
    levels = grid_levels(grid_size).astype(np.int64)
    return kmap, neighbours, (2 * levels + 1).astype(np.float32), levels


_XXS_KMAP, _XXS_NEIGHBOURS, _XXS_POSITIONS, _XXS_LEVELS = _kernel_tables(256)
_S_KMAP, _S_NEIGHBOURS, _S_POSITIONS, _S_LEVELS = _kernel_tables(512)
# The decoders read ggml-common.h's grids (bytes 4..62 for IQ3_XXS, 1..15 for IQ3_S) and sign table.
_XXS_GRID_BYTES = grid_table("iq3xxs_grid").astype("<u4").view(np.uint8).astype(np.float32).reshape(-1, 4)
_S_GRID_BYTES = grid_table("iq3s_grid").astype("<u4").view(np.uint8).astype(np.float32).reshape(-1, 4)
_KSIGNS = grid_table("ksigns_iq2xs").astype(np.int64)


@njit(cache=True)
def _best_neighbour(neighbours, offset, positions, levels, xval, waux, start, scale, L):
    """ggml's iq3_find_best_neighbour: of the grid points listed at neighbours[offset], the one with
    the least Σ w·(scale·q − x)² over the group at xval[start:start+4]; its levels go to L.

    Where every candidate's error is inf or NaN (|x| beyond ~1e12, where the float32 sums
    overflow) ggml aborts on an assertion; here the first, nearest neighbour is taken.
    """
    count = np.int64(neighbours[offset])
    best_d2 = FLOAT_MAX
    grid_index = np.int64(neighbours[offset + 1])
    for j in range(1, count + 1):
        candidate = np.int64(neighbours[offset + j])
        d2 = ZERO
        for i in range(4):
            diff = scale * positions[candidate, i] - xval[start + i]
            d2 += waux[start + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            grid_index = candidate
    for i in range(4):
        L[start + i] = levels[grid_index, i]
    return grid_index


@njit(cache=True)
def _group_point(xval, start, inverse_scale):
    """The 12-bit index of the levels nearest_int((x/scale − 1)/2), clamped to 0..7, of one group."""
    index = 0
    for i in range(4):
        level = max(0, min(MAX_LEVEL, nearest_int(HALF * (inverse_scale * xval[start + i] - ONE))))
        index |= level << (3 * i)
    return index


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
def _block_scale(xval, weight, waux, max_value, L, Laux, on_grid, on_grid_aux, tables, n_steps, refit_every_group):
    """The scale search of one block; leaves the chosen levels in L (every group on the grid).

    Starts from scale max/15 with every group counted on the grid (IQ3_XXS) or
    off it (IQ3_S: ggml initializes the flags to false there, so a block where
    no trial wins is always re-snapped). The re-snap pass redoes only the
    off-grid groups for IQ3_XXS, every group for IQ3_S, as ggml does.
    """
    kmap, neighbours, positions, levels = tables
    L[:] = 0  # a block where no trial wins codes all levels 0, as ggml's memset leaves them
    best = ZERO
    scale = max_value / _TOP_MAGNITUDE
    on_grid[:] = not refit_every_group
    for step in range(-n_steps, n_steps + 1):
        inverse_scale = (_TOP_MAGNITUDE + F32(step) * _STEP) / max_value
        this_scale = ONE / inverse_scale
        for k in range(GROUPS):
            start = 4 * k
            point = _group_point(xval, start, inverse_scale)
            grid_index = kmap[point]
            on_grid_aux[k] = grid_index >= 0
            if grid_index >= 0:
                for i in range(4):
                    Laux[start + i] = (point >> (3 * i)) & MAX_LEVEL
            else:
                _best_neighbour(neighbours, -grid_index - 1, positions, levels, xval, waux, start, this_scale, Laux)
        sumqx, sumq2 = _weighted_sums(xval, weight, Laux)
        if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = Laux
            on_grid[:] = on_grid_aux
    n_off_grid = 0
    for k in range(GROUPS):
        n_off_grid += not on_grid[k]
    if n_off_grid > 0 and scale > ZERO:
        inverse_scale = ONE / scale
        for k in range(GROUPS):
            if on_grid[k] and not refit_every_group:
                continue
            start = 4 * k
            point = _group_point(xval, start, inverse_scale)
            grid_index = kmap[point]
            if grid_index >= 0:
                for i in range(4):
                    L[start + i] = (point >> (3 * i)) & MAX_LEVEL
            else:
                _best_neighbour(neighbours, -grid_index - 1, positions, levels, xval, waux, start, scale, L)
        sumqx, sumq2 = _weighted_sums(xval, weight, L)
        if sumq2 > ZERO:
            scale = sumqx / sumq2
    return scale


@njit(cache=True)
def _grid_index(kmap, L, k):
    """The grid index of group k's levels (always on the grid after the search)."""
    point = 0
    for i in range(4):
        point |= np.int64(L[4 * k + i]) << (3 * i)
    return np.int64(kmap[point])


@njit(cache=True)
def _block_weights(xb, imatrix_block, sigma2, weight, waux):
    """x², or imatrix · sqrt(σ² + x²); and their square roots, which weigh the neighbour search."""
    if imatrix_block.size:
        for i in range(BLOCK):
            weight[i] = imatrix_block[i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:
        for i in range(BLOCK):
            weight[i] = xb[i] * xb[i]
    for i in range(BLOCK):
        waux[i] = np.sqrt(weight[i])


@njit(cache=True)
def _sigma2(xbl):
    sumx2 = ZERO
    for i in range(QK_K):
        sumx2 += xbl[i] * xbl[i]
    return F32(2) * sumx2 / F32(QK_K)


@njit(cache=True)
def _block_max(xval):
    max_value = xval[0]
    for i in range(1, BLOCK):
        max_value = max_value if max_value > xval[i] else xval[i]
    return max_value


@njit(cache=True)
def _xxs_magnitudes(xb, weight, xval, signs):
    """|x| and the sign bits of each 8 elements, with an even number of minus signs: where the
    count is odd, the element of least w·x² keeps its sign (its magnitude goes negative)."""
    for k in range(SIGN_BYTES):
        n_flip = 0
        bits = 0
        for i in range(8):
            value = xb[8 * k + i]
            if value >= ZERO:
                xval[8 * k + i] = value
            else:
                xval[8 * k + i] = -value
                n_flip += 1
                bits |= 1 << i
        if n_flip % 2:
            least = 0
            least_importance = weight[8 * k] * xb[8 * k] * xb[8 * k]
            for i in range(1, 8):
                importance = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                if importance < least_importance:
                    least_importance = importance
                    least = i
            xval[8 * k + least] = -xval[8 * k + least]
            bits ^= 1 << least
        signs[k] = bits & 127


@njit(cache=True, error_model="numpy")
def _quantize_xxs_super_block(xbl, imatrix, out, offset, scratch):
    scales, weight, waux, xval, L, Laux, on_grid, on_grid_aux, signs = scratch
    tables = (_XXS_KMAP, _XXS_NEIGHBOURS, _XXS_POSITIONS, _XXS_LEVELS)
    out[offset : offset + _XXS_BYTES] = 0
    sigma2 = _sigma2(xbl)
    max_scale = ZERO
    for ib in range(N_BLOCKS):
        start = ib * BLOCK
        xb = xbl[start : start + BLOCK]
        _block_weights(xb, imatrix[start : start + BLOCK] if imatrix.size else imatrix, sigma2, weight, waux)
        _xxs_magnitudes(xb, weight, xval, signs)
        max_value = _block_max(xval)
        if max_value < _XXS_MAX_EPS:
            scales[ib] = ZERO
            continue
        scale = _block_scale(xval, weight, waux, max_value, L, Laux, on_grid, on_grid_aux, tables, _XXS_STEPS, False)
        if scale < ZERO:  # ggml: "should never happen": flip the scale and the signs
            scale = -scale
            for k in range(SIGN_BYTES):
                signs[k] = ~signs[k] & 127
        for k in range(GROUPS):
            out[offset + _XXS_QS + GROUPS * ib + k] = np.uint8(_grid_index(_XXS_KMAP, L, k))
        packed = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
        _store_u32(out, offset + _XXS_SCALES_AND_SIGNS + 4 * ib, packed)
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == ZERO:
        out[offset : offset + _XXS_BYTES] = 0
        return
    d = max_scale / F32(31)
    store_fp16(out, offset, d * _XXS_FUDGE)
    inverse_d = ONE / d
    for ib in range(N_BLOCKS):
        at = offset + _XXS_SCALES_AND_SIGNS + 4 * ib + 3
        out[at] = np.uint8(out[at] | (odd_multiplier_level(inverse_d, scales[ib], _SCALE_LEVELS) << 4))


@njit(cache=True)
def _store_u32(out, offset, bits):
    for byte in range(4):
        out[offset + byte] = np.uint8((bits >> (8 * byte)) & 0xFF)


@njit(cache=True, error_model="numpy")
def _quantize_s_super_block(xbl, imatrix, out, offset, scratch):
    scales, weight, waux, xval, L, Laux, on_grid, on_grid_aux, _ = scratch
    tables = (_S_KMAP, _S_NEIGHBOURS, _S_POSITIONS, _S_LEVELS)
    out[offset : offset + _S_BYTES] = 0
    sigma2 = _sigma2(xbl)
    max_scale = ZERO
    # ggml advances its qs and signs pointers only past blocks it codes: after an all-zero block the
    # next blocks' indices and signs land one block early, and the decoder reads them misplaced.
    qs = offset + _S_QS
    signs = offset + _S_SIGNS
    for ib in range(N_BLOCKS):
        start = ib * BLOCK
        xb = xbl[start : start + BLOCK]
        _block_weights(xb, imatrix[start : start + BLOCK] if imatrix.size else imatrix, sigma2, weight, waux)
        for k in range(SIGN_BYTES):
            bits = 0
            for i in range(8):
                value = xb[8 * k + i]
                if value >= ZERO:
                    xval[8 * k + i] = value
                else:
                    xval[8 * k + i] = -value
                    bits |= 1 << i
            out[signs + k] = np.uint8(bits)
        max_value = _block_max(xval)
        if max_value == ZERO:
            scales[ib] = ZERO
            for k in range(SIGN_BYTES):  # ggml kept these signs in scratch only
                out[signs + k] = 0
            continue
        scale = _block_scale(xval, weight, waux, max_value, L, Laux, on_grid, on_grid_aux, tables, _S_STEPS, True)
        if scale < ZERO:  # ggml: "should never happen": flip the scale and the signs
            scale = -scale
            for k in range(SIGN_BYTES):
                out[signs + k] ^= np.uint8(0xFF)
        for k in range(GROUPS):
            grid_index = _grid_index(_S_KMAP, L, k)
            out[qs + k] = np.uint8(grid_index & 255)
            out[offset + _S_QH + ib] |= np.uint8((grid_index >> 8) << k)
        qs += GROUPS
        signs += SIGN_BYTES
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale
    if max_scale == ZERO:
        return
    d = max_scale / F32(31)
    store_fp16(out, offset, d * _S_FUDGE)
    inverse_d = ONE / d
    for ib in range(0, N_BLOCKS, 2):
        low = odd_multiplier_level(inverse_d, scales[ib], _SCALE_LEVELS)
        high = odd_multiplier_level(inverse_d, scales[ib + 1], _SCALE_LEVELS)
        out[offset + _S_SCALES + ib // 2] = np.uint8(low | (high << 4))


@njit(cache=True)
def _row_scratch():
    return (
        np.empty(N_BLOCKS, dtype=np.float32),  # scales
        np.empty(BLOCK, dtype=np.float32),  # weight
        np.empty(BLOCK, dtype=np.float32),  # waux
        np.empty(BLOCK, dtype=np.float32),  # xval
        np.zeros(BLOCK, dtype=np.int64),  # L
        np.zeros(BLOCK, dtype=np.int64),  # Laux
        np.empty(GROUPS, dtype=np.bool_),  # on_grid
        np.empty(GROUPS, dtype=np.bool_),  # on_grid_aux
        np.zeros(SIGN_BYTES, dtype=np.int64),  # IQ3_XXS's 7-bit signs of each 8 elements
    )


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq3_xxs(x, imatrix, out):
    """ggml's quantize_row_iq3_xxs_impl(256, …) on one row; an empty imatrix is ggml's NULL."""
    scratch = _row_scratch()
    for sb in range(x.size // QK_K):
        start = sb * QK_K
        super_block_imatrix = imatrix[start : start + QK_K] if imatrix.size else imatrix
        _quantize_xxs_super_block(x[start : start + QK_K], super_block_imatrix, out, sb * _XXS_BYTES, scratch)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq3_s(x, imatrix, out):
    """ggml's quantize_row_iq3_s_impl(32, …) on one row; an empty imatrix is ggml's NULL."""
    scratch = _row_scratch()
    for sb in range(x.size // QK_K):
        start = sb * QK_K
        super_block_imatrix = imatrix[start : start + QK_K] if imatrix.size else imatrix
        _quantize_s_super_block(x[start : start + QK_K], super_block_imatrix, out, sb * _S_BYTES, scratch)


@njit(cache=True)
def _dequantize_group(grid_bytes, grid_index, db, sign_bits, out, at):
    """Four values db · grid byte, negated where their bit of sign_bits is set."""
    for j in range(4):
        value = db * grid_bytes[grid_index, j]
        out[at + j] = -value if (sign_bits >> j) & 1 else value


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_iq3_xxs(q, out):
    for sb in range(out.size // QK_K):
        offset = sb * _XXS_BYTES
        d = load_fp16(q, offset)
        for ib in range(N_BLOCKS):
            at = offset + _XXS_SCALES_AND_SIGNS + 4 * ib
            aux = 0
            for byte in range(4):
                aux |= np.int64(q[at + byte]) << (8 * byte)
            db = d * (HALF + F32(aux >> 28)) * HALF
            for half in range(4):
                sign_bits = _KSIGNS[(aux >> (7 * half)) & 127]
                element = sb * QK_K + ib * BLOCK + 8 * half
                qs = offset + _XXS_QS + GROUPS * ib + 2 * half
                _dequantize_group(_XXS_GRID_BYTES, np.int64(q[qs]), db, sign_bits, out, element)
                _dequantize_group(_XXS_GRID_BYTES, np.int64(q[qs + 1]), db, sign_bits >> 4, out, element + 4)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_iq3_s(q, out):
    for sb in range(out.size // QK_K):
        offset = sb * _S_BYTES
        d = load_fp16(q, offset)
        for ib in range(N_BLOCKS):
            multiplier = (np.int64(q[offset + _S_SCALES + ib // 2]) >> (4 * (ib % 2))) & 0x0F
            db = d * F32(1 + 2 * multiplier)
            high_bits = np.int64(q[offset + _S_QH + ib])
            for half in range(4):
                sign_bits = np.int64(q[offset + _S_SIGNS + SIGN_BYTES * ib + half])
                element = sb * QK_K + ib * BLOCK + 8 * half
                qs = offset + _S_QS + GROUPS * ib + 2 * half
                first = np.int64(q[qs]) | (((high_bits >> (2 * half)) & 1) << 8)
                second = np.int64(q[qs + 1]) | (((high_bits >> (2 * half + 1)) & 1) << 8)
                _dequantize_group(_S_GRID_BYTES, first, db, sign_bits, out, element)
                _dequantize_group(_S_GRID_BYTES, second, db, sign_bits >> 4, out, element + 4)


KERNELS = {
    GGMLQuantizationType.IQ3_XXS: (quantize_row_iq3_xxs, dequantize_row_iq3_xxs),
    GGMLQuantizationType.IQ3_S: (quantize_row_iq3_s, dequantize_row_iq3_s),
}
