"""2-bit lattice quantizers: IQ2_XXS (2.06 bits per weight) and IQ2_XS (2.31), super-blocks of 256.

Both store every group of 8 weights as the index of one point of a fixed grid (256 points for IQ2_XXS,
512 for IQ2_XS) whose coordinates are 1, 3 or 5 times a scale, plus 7 sign bits: the eighth sign is
implied, since ggml flips the least important element so that every group has an even number of
negative values. The scale search is ggml's `quantize_row_iq2_xxs_impl` / `quantize_row_iq2_xs_impl`:
round each group to the nearest levels for a dozen or more trial scales, replace an off-grid group by
its best neighbour from `iq2_grids` (the weighted error picks among the nearest grid points), keep the
scale with the largest (Σwqx)²/Σwq². IQ2_XXS scales blocks of 32, IQ2_XS blocks of 16, each with a
4-bit multiplier of the super-block's fp16 scale. ggml requires an imatrix for both, and so do these
kernels (an empty one raises ValueError). Byte layouts are ggml's `block_iq2_xxs` and `block_iq2_xs`.

The search tables are Numba globals, frozen into the compiled code (and its disk cache) when a kernel
is first compiled: the kernels then read them like constants, and a warm import only loads them from
bpwopt's cache folder.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.iq2_grids import GROUP, iq2_tables
from bpwopt.quant.kernels.numerics import (
    F32,
    FLOAT_MAX,
    GROUP_MAX_EPS,
    HALF,
    ONE,
    ZERO,
    load_fp16,
    load_u16,
    nearest_int,
    odd_multiplier_level,
    store_fp16,
    store_u16,
    sum_of_squares,
)
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW
from bpwopt.quant.kernels.scale_search import make_qp_quants
from bpwopt.quant.tables import grid_table

SUPER_BLOCK, _XXS_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS]
_XS_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XS][1]
_XXS_BLOCK = 32  # elements per IQ2_XXS scale: 4 groups
_XS_BLOCK = 16  # elements per IQ2_XS scale: 2 groups
_QS = 2  # the quants follow the fp16 super-block scale
_XS_SCALES = _QS + SUPER_BLOCK // 4  # IQ2_XS: the 4-bit block multipliers follow the 64 bytes of quants
_MAX_LEVEL = 2  # levels 0..2: grid coordinates 2l+1 = 1, 3, 5 (ggml's kMaxQ − 1)
_LEVEL_COUNT = _MAX_LEVEL + 1
_TOP_POSITION = F32(5)  # 2·kMaxQ − 1, the largest coordinate
_TENTH = F32(0.1)
_QUARTER = F32(0.25)
_MULTIPLIER_STEPS = F32(31)  # d = largest block scale / 31, so that it gets multiplier (2·15 + 1)/2 · d
_MAX_MULTIPLIER = 15


def _search_tables(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid coordinates float32 (grid_size, 8), point map int32[3**8], neighbour lists uint16) of one grid.

    These quantizers clamp every level to 0..2, so of ggml's map (2 bits per coordinate, 43692
    entries) they only ever read the 3**8 points of levels 0..2. The kernels index those in base 3,
    and keep only their neighbour lists, in ggml's order (count, then indices): a tenth of the size,
    below Numba's 1 MB limit for arrays it freezes into (cacheable) compiled code.
    """
    grid, kmap, neighbours = iq2_tables(grid_size)
    coordinates = grid.view(np.int8).reshape(grid_size, GROUP).astype(np.float32)
    points = np.arange(_LEVEL_COUNT**GROUP)
    digits = (points[:, None] // _LEVEL_COUNT ** np.arange(GROUP)) % _LEVEL_COUNT
    point_map = kmap[np.sum(digits << (2 * np.arange(GROUP)), axis=1)]
    off_grid = point_map < 0
    sources = -point_map[off_grid].astype(np.int64) - 1
    lengths = neighbours[sources].astype(np.int64) + 1
    starts = np.cumsum(lengths) - lengths
    lists = neighbours[np.repeat(sources - starts, lengths) + np.arange(np.sum(lengths))]
    point_map[off_grid] = -(starts + 1)
    return coordinates, point_map.astype(np.int32), lists


_XXS_GRID, _XXS_MAP, _XXS_NEIGHBOURS = _search_tables(256)
_XS_GRID, _XS_MAP, _XS_NEIGHBOURS = _search_tables(512)
# The decoders use ggml-common.h's grids (bytes 8, 25, 43 for the coordinates 1, 3, 5), as ggml's do.
_XXS_VALUES = grid_table("iq2xxs_grid").view(np.uint8).reshape(-1, GROUP).astype(np.float32)
_XS_VALUES = grid_table("iq2xs_grid").view(np.uint8).reshape(-1, GROUP).astype(np.float32)
_SIGNS = grid_table("ksigns_iq2xs").astype(np.int64)  # 7 stored sign bits → 8 (the parity bit added)
_SIGN_MASKS = grid_table("kmask_iq2xs").astype(np.int64)


@njit(cache=True)
def _group_weights(block, block_imatrix, sigma2, weight, weight_sqrt):
    """imatrix · sqrt(σ² + x²) for the scale search, and its square root for the neighbour search."""
    for i in range(block.size):
        weight[i] = block_imatrix[i] * np.sqrt(sigma2 + block[i] * block[i])
        weight_sqrt[i] = np.sqrt(weight[i])


@njit(cache=True)
def _fold_signs(block, weight, start, xval):
    """|x| of the group at start, with an even number of signs: where x has an odd number of negative
    values, the one of least w·x² keeps its sign (xval < 0 there). Returns the 7 stored sign bits."""
    n_flipped = 0
    signs = 0
    for i in range(GROUP):
        value = block[start + i]
        if value >= ZERO:
            xval[start + i] = value
        else:
            xval[start + i] = -value
            n_flipped += 1
            signs |= 1 << i
    if n_flipped % 2:
        least = 0
        least_value = weight[start] * block[start] * block[start]
        for i in range(1, GROUP):
            candidate = weight[start + i] * block[start + i] * block[start + i]
            if candidate < least_value:
                least_value = candidate
                least = i
        xval[start + least] = -xval[start + least]
        signs ^= 1 << least
    return signs & 127


@njit(cache=True)
def _round_group(xval, start, inverse_scale, levels):
    """Levels nearest(½(x/scale − 1)) clamped to 0..2 into levels[start:start+8]; returns their point
    index (base 3, first coordinate lowest)."""
    index = 0
    place = 1
    for i in range(GROUP):
        level = max(0, min(_MAX_LEVEL, nearest_int(HALF * (inverse_scale * xval[start + i] - ONE))))
        levels[start + i] = level
        index += level * place
        place *= _LEVEL_COUNT
    return index


@njit(cache=True)
def _best_neighbour(grid, kmap, neighbours, index, xval, weight_sqrt, start, scale, levels):
    """ggml's iq2_find_best_neighbour for the off-grid point `index`: the listed grid point of least
    Σ w(scale·q − x)², its levels written into levels[start:start+8]; returns its grid index.

    Where no distance is below FLT_MAX (weights or errors overflowed: |x| above ~1e15), ggml aborts
    the process; this returns the first listed point, the one nearest in the lattice.
    """
    offset = -kmap[index] - 1
    count = np.int64(neighbours[offset])
    best_distance = FLOAT_MAX
    best = -1
    for j in range(1, count + 1):
        candidate = np.int64(neighbours[offset + j])
        distance = ZERO
        for i in range(GROUP):
            diff = scale * grid[candidate, i] - xval[start + i]
            distance += weight_sqrt[start + i] * diff * diff
        if distance < best_distance:
            best_distance = distance
            best = candidate
    if best < 0:
        best = np.int64(neighbours[offset + 1])
    for i in range(GROUP):
        levels[start + i] = (int(grid[best, i]) - 1) // 2
    return best


@njit(cache=True)
def _grid_index(grid, kmap, neighbours, levels, start):
    """The grid index of the (final, on-grid) levels of a group.

    Off the grid ggml aborts ("found point not on grid"); that happens only where the scale became
    NaN, so the block decodes to NaN whatever index stands here: this takes the lattice-nearest
    point, or point 0 for levels outside 0..2 (which ggml would look up out of its map's bounds).
    """
    index = 0
    place = 1
    for i in range(GROUP):
        level = levels[start + i]
        if level < 0 or level > _MAX_LEVEL:
            return 0
        index += level * place
        place *= _LEVEL_COUNT
    if kmap[index] >= 0:
        return np.int64(kmap[index])
    return np.int64(neighbours[-kmap[index]])


@njit(cache=True)
def _weighted_sums(xval, weight, levels):
    """Σ w·x·q and Σ w·q² with q = 2l + 1, in the C's order."""
    sumqx = ZERO
    sumq2 = ZERO
    for i in range(xval.size):
        w = weight[i]
        q = F32(2 * levels[i] + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True)
def _larger(a, b):
    """C's MAX(a, b) = a > b ? a : b (with a NaN, b wins)."""
    return a if a > b else b


@njit(cache=True)
def _largest(values):
    largest = values[0]
    for i in range(1, values.size):
        largest = _larger(largest, values[i])
    return largest


@njit(cache=True, error_model="numpy")
def _xxs_block(grid, kmap, neighbours, xval, weight, weight_sqrt, levels, trial, qp_levels):
    """(scale, skipped) of one 32-element IQ2_XXS block, its levels left in `levels` (ggml's search).

    skipped: the block is all zero (or its first scale is not positive), and ggml leaves its quants 0.
    """
    n_groups = xval.size // GROUP
    if _largest(xval) < GROUP_MAX_EPS:
        return ZERO, True
    scale = make_qp_quants(_MAX_LEVEL + 2, xval, qp_levels, weight)
    for i in range(xval.size):  # C keeps them in an int8 array: 0..255 read back as −128..127
        level = np.int64(qp_levels[i])
        levels[i] = level - 256 if level > 127 else level
    top = scale * F32(_MAX_LEVEL + 1)
    if top <= ZERO:
        return ZERO, True
    best = ZERO
    for step in range(-6, 7):
        inverse_scale = (_TOP_POSITION + F32(step) * _TENTH) / top
        trial_scale = ONE / inverse_scale
        for k in range(n_groups):
            index = _round_group(xval, GROUP * k, inverse_scale, trial)
            if kmap[index] < 0:
                _best_neighbour(grid, kmap, neighbours, index, xval, weight_sqrt, GROUP * k, trial_scale, trial)
        sumqx, sumq2 = _weighted_sums(xval, weight, trial)
        if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            levels[:] = trial
    if scale > ZERO:
        inverse_scale = ONE / scale
        for k in range(n_groups):
            index = _round_group(xval, GROUP * k, inverse_scale, levels)
            if kmap[index] < 0:
                _best_neighbour(grid, kmap, neighbours, index, xval, weight_sqrt, GROUP * k, scale, levels)
        sumqx, sumq2 = _weighted_sums(xval, weight, levels)
        if sumq2 > ZERO:
            scale = sumqx / sumq2
    return scale, False


@njit(cache=True, error_model="numpy")
def _xs_block(grid, kmap, neighbours, xval, weight, weight_sqrt, levels, trial, on_grid, trial_on_grid):
    """(scale, skipped) of one 16-element IQ2_XS block, its levels left in `levels` (ggml's search).

    skipped: the block is all zero, and ggml leaves its quants 0.
    """
    n_groups = xval.size // GROUP
    levels[:] = 0
    largest = _largest(xval)
    if largest < GROUP_MAX_EPS:
        return ZERO, True
    best = ZERO
    scale = largest / _TOP_POSITION
    on_grid[:] = True
    for step in range(-9, 10):
        inverse_scale = (_TOP_POSITION + F32(step) * _TENTH) / largest
        trial_scale = ONE / inverse_scale
        for k in range(n_groups):
            index = _round_group(xval, GROUP * k, inverse_scale, trial)
            trial_on_grid[k] = kmap[index] >= 0
            if not trial_on_grid[k]:
                _best_neighbour(grid, kmap, neighbours, index, xval, weight_sqrt, GROUP * k, trial_scale, trial)
        sumqx, sumq2 = _weighted_sums(xval, weight, trial)
        if sumq2 > ZERO and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            levels[:] = trial
            on_grid[:] = trial_on_grid
    if not on_grid.all() and scale > ZERO:
        inverse_scale = ONE / scale
        for k in range(n_groups):
            if on_grid[k]:
                continue
            index = _round_group(xval, GROUP * k, inverse_scale, levels)
            if kmap[index] < 0:
                _best_neighbour(grid, kmap, neighbours, index, xval, weight_sqrt, GROUP * k, scale, levels)
        sumqx, sumq2 = _weighted_sums(xval, weight, levels)
        if sumq2 > ZERO:
            scale = sumqx / sumq2
    return scale, False


@njit(cache=True, error_model="numpy")
def _quantize_iq2_row(x, imatrix, out, is_xs):
    """Both types' row kernel; the scratch is allocated once per row."""
    if imatrix.size == 0:
        raise ValueError("IQ2_XXS and IQ2_XS need an importance matrix")
    block = _XS_BLOCK if is_xs else _XXS_BLOCK
    block_bytes = _XS_BYTES if is_xs else _XXS_BYTES
    n_blocks = SUPER_BLOCK // block
    n_groups = block // GROUP
    weight = np.empty(block, dtype=np.float32)
    weight_sqrt = np.empty(block, dtype=np.float32)
    xval = np.empty(block, dtype=np.float32)
    levels = np.empty(block, dtype=np.int64)
    trial = np.empty(block, dtype=np.int64)
    qp_levels = np.empty(block, dtype=np.uint8)
    on_grid = np.empty(n_groups, dtype=np.bool_)
    trial_on_grid = np.empty(n_groups, dtype=np.bool_)
    signs = np.empty(n_groups, dtype=np.int64)
    scales = np.empty(n_blocks, dtype=np.float32)
    indices = np.empty((n_blocks, n_groups), dtype=np.int64)
    block_signs = np.empty((n_blocks, n_groups), dtype=np.int64)
    for sb in range(x.size // SUPER_BLOCK):
        offset = sb * block_bytes
        start = sb * SUPER_BLOCK
        super_block = x[start : start + SUPER_BLOCK]
        sigma2 = sum_of_squares(super_block) / F32(SUPER_BLOCK)
        indices[:] = 0
        block_signs[:] = 0
        largest_scale = ZERO
        for ib in range(n_blocks):
            values = super_block[ib * block : (ib + 1) * block]
            _group_weights(values, imatrix[start + ib * block : start + (ib + 1) * block], sigma2, weight, weight_sqrt)
            for k in range(n_groups):
                signs[k] = _fold_signs(values, weight, GROUP * k, xval)
            if is_xs:
                scale, skipped = _xs_block(
                    _XS_GRID, _XS_MAP, _XS_NEIGHBOURS, xval, weight, weight_sqrt, levels, trial, on_grid, trial_on_grid
                )
            else:
                scale, skipped = _xxs_block(
                    _XXS_GRID, _XXS_MAP, _XXS_NEIGHBOURS, xval, weight, weight_sqrt, levels, trial, qp_levels
                )
            if skipped:
                scales[ib] = ZERO
                continue
            if scale < ZERO:  # never expected (ggml's comment); flip the scale and every sign
                scale = -scale
                for k in range(n_groups):
                    signs[k] = ~signs[k] & 127
            for k in range(n_groups):
                if is_xs:
                    indices[ib, k] = _grid_index(_XS_GRID, _XS_MAP, _XS_NEIGHBOURS, levels, GROUP * k)
                else:
                    indices[ib, k] = _grid_index(_XXS_GRID, _XXS_MAP, _XXS_NEIGHBOURS, levels, GROUP * k)
                block_signs[ib, k] = signs[k]
            scales[ib] = scale
            largest_scale = _larger(largest_scale, scale)
        _store_super_block(out, offset, largest_scale, scales, indices, block_signs, is_xs)


@njit(cache=True, error_model="numpy")
def _store_super_block(out, offset, largest_scale, scales, indices, block_signs, is_xs):
    """The fp16 d = largest scale / 31, every block's 4-bit multiplier of it, the grid indices and signs."""
    block_bytes = _XS_BYTES if is_xs else _XXS_BYTES
    out[offset : offset + block_bytes] = 0
    if largest_scale == ZERO:
        return
    d = largest_scale / _MULTIPLIER_STEPS
    store_fp16(out, offset, d)
    inverse_d = ONE / d
    n_blocks, n_groups = indices.shape
    for ib in range(n_blocks):
        multiplier = odd_multiplier_level(inverse_d, scales[ib], _MAX_MULTIPLIER)
        if is_xs:
            for k in range(n_groups):
                store_u16(out, offset + _QS + 2 * (n_groups * ib + k), indices[ib, k] | (block_signs[ib, k] << 9))
            out[offset + _XS_SCALES + ib // 2] |= np.uint8(multiplier << (4 * (ib % 2)))
        else:
            base = offset + _QS + 8 * ib
            word = multiplier << 28
            for k in range(n_groups):
                out[base + k] = np.uint8(indices[ib, k])
                word |= block_signs[ib, k] << (7 * k)
            for byte in range(4):
                out[base + 4 + byte] = np.uint8((word >> (8 * byte)) & 0xFF)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq2_xxs(x, imatrix, out):
    _quantize_iq2_row(x, imatrix, out, False)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq2_xs(x, imatrix, out):
    _quantize_iq2_row(x, imatrix, out, True)


@njit(cache=True)
def _dequantize_group(values, grid_index, signs, scale, out, out_offset):
    sign_bits = _SIGNS[signs]
    for j in range(GROUP):
        value = scale * values[grid_index, j]
        out[out_offset + j] = -value if sign_bits & _SIGN_MASKS[j] else value


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_iq2_xxs(q, out):
    for sb in range(out.size // SUPER_BLOCK):
        offset = sb * _XXS_BYTES
        d = load_fp16(q, offset)
        for ib in range(SUPER_BLOCK // _XXS_BLOCK):
            base = offset + _QS + 8 * ib
            word = np.int64(load_u16(q, base + 4)) | (np.int64(load_u16(q, base + 6)) << 16)
            scale = d * (HALF + F32(word >> 28)) * _QUARTER
            for k in range(_XXS_BLOCK // GROUP):
                out_offset = sb * SUPER_BLOCK + ib * _XXS_BLOCK + k * GROUP
                _dequantize_group(_XXS_VALUES, np.int64(q[base + k]), (word >> (7 * k)) & 127, scale, out, out_offset)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_iq2_xs(q, out):
    for sb in range(out.size // SUPER_BLOCK):
        offset = sb * _XS_BYTES
        d = load_fp16(q, offset)
        for ib in range(SUPER_BLOCK // _XS_BLOCK):
            multiplier = (np.int64(q[offset + _XS_SCALES + ib // 2]) >> (4 * (ib % 2))) & 0x0F
            scale = d * (HALF + F32(multiplier)) * _QUARTER
            for k in range(_XS_BLOCK // GROUP):
                packed = np.int64(load_u16(q, offset + _QS + 2 * (ib * (_XS_BLOCK // GROUP) + k)))
                out_offset = sb * SUPER_BLOCK + ib * _XS_BLOCK + k * GROUP
                _dequantize_group(_XS_VALUES, packed & 511, packed >> 9, scale, out, out_offset)


KERNELS = {
    GGMLQuantizationType.IQ2_XXS: (quantize_row_iq2_xxs, dequantize_row_iq2_xxs),
    GGMLQuantizationType.IQ2_XS: (quantize_row_iq2_xs, dequantize_row_iq2_xs),
}
