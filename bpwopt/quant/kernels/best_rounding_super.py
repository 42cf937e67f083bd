"""Better rounding (`--rounding best`) for the super-block types, in ggml's own block layouts.

Q3_K, Q6_K and IQ4_XS give each sub-block (16 or 32 elements) a signed integer
scale level times one fp16 super-block scale d; Q2_K, Q4_K and Q5_K give each a
scale level and a min level, times fp16 d and dmin. ggml chooses the sub-block
parameters by a short search and then quantizes them against the largest.
Here, for every super-block of 256, with the error Σ w (x − x̂)² (w = the
imatrix, 1 without one) that bpwopt measures:

1. every sub-block's best real parameters: the exact inverse-scale scan of
   `best_rounding` (scale-only types), or its refitted affine fit with the min
   kept ≤ 0 as the format stores it;
2. a grid of fp16 super-block values around (largest sub-block value)/(largest
   level); at each, every sub-block takes whichever of the integer levels next
   to its real value (scale and min for the affine types) errs least with its
   elements re-rounded for it, and the grid point of least total error wins;
3. that candidate is packed by ggml's own packer (which re-rounds every
   element against the decoded scales), decoded by ggml's decoder, and it
   replaces ggml's super-block only if its error is strictly lower.

So a `best` super-block is never worse than ggml's under that error, and is
ggml's bytes where nothing better was found.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels import iq4, kquants_affine, kquants_symmetric
from bpwopt.quant.kernels.best_rounding import (
    affine_fit,
    best_real_scale,
    block_weights,
    ggml_row,
    midpoints_of,
    restored_error,
    scaled_error,
)
from bpwopt.quant.kernels.numerics import F32, load_fp16, round_to_fp16
from bpwopt.quant.kernels.rows import QUANTIZE_ROW

Q = GGMLQuantizationType
QK_K = 256
LAYOUT_Q3_K, LAYOUT_Q6_K, LAYOUT_IQ4_XS = range(3)
# Windows of the sub-block scan, as multiples of (largest level)/amax: Q6_K and IQ4_XS take best_rounding's;
# Q3_K's eight levels change rarely, so a wider window costs little.
_WINDOW = np.array((0.85, 1.1))
_Q3_K_WINDOW = np.array((0.6, 1.4))
# The super-block values tried: (largest sub-block value)/(largest level + δ) for these δ.
_SCALE_STEPS = np.arange(-2.0, 1.0001, 0.25)
_MIN_STEPS = np.arange(-1.5, 0.5001, 0.5)

_Q3_LEVELS = np.arange(-kquants_symmetric.Q3_NMAX, kquants_symmetric.Q3_NMAX, dtype=np.float32)
_Q6_LEVELS = np.arange(-kquants_symmetric.Q6_NMAX, kquants_symmetric.Q6_NMAX, dtype=np.float32)
_IQ4_LEVELS = iq4.KVALUES_IQ4NL.astype(np.float32)
_Q3_MID, _Q6_MID, _IQ4_MID = (midpoints_of(levels) for levels in (_Q3_LEVELS, _Q6_LEVELS, _IQ4_LEVELS))
_Q3_K_BYTES, _Q6_K_BYTES, _IQ4_XS_BYTES = (GGML_QUANT_SIZES[t][1] for t in (Q.Q3_K, Q.Q6_K, Q.IQ4_XS))


# ---------------------------------------------------------------- scale-only: Q3_K, Q6_K, IQ4_XS


@njit(cache=True)
def _real_sub_scales(block, weight, levels, midpoints, uniform, window, sub_size, real_scales):
    """Each sub-block's best real signed scale (0 for an all-zero sub-block)."""
    index = np.empty(sub_size, dtype=np.int64)
    event_t = np.empty(sub_size * levels.size, dtype=np.float64)
    event_j = np.empty(sub_size * levels.size, dtype=np.int64)
    y = np.empty(sub_size, dtype=np.float64)
    reach = max(abs(np.float64(levels[0])), abs(np.float64(levels[-1])))
    for j in range(real_scales.size):
        sub = block[j * sub_size:(j + 1) * sub_size]
        sub_weight = weight[j * sub_size:(j + 1) * sub_size]
        real_scales[j] = 0.0
        amax = np.abs(sub).max()
        if amax == 0:
            continue
        best_error = np.inf
        for sign in (1.0, -1.0):  # the levels are not symmetric
            for i in range(sub_size):
                y[i] = sign * np.float64(sub[i])
            d = best_real_scale(
                y, sub_weight, levels, midpoints, uniform, window[0] * reach / amax, window[1] * reach / amax,
                index, event_t, event_j,
            )
            if d == 0:
                continue
            error = scaled_error(sub, sub_weight, levels, midpoints, uniform, F32(sign * d), index)
            if error < best_error:
                best_error, real_scales[j] = error, sign * d


@njit(cache=True)
def _best_super_scale(block, weight, levels, midpoints, uniform, sub_size, level_range, real_scales, chosen):
    """The fp16 d and integer sub-block levels (in chosen) of least total error over the grid of d.

    Returns (d, error); d = 0 when every sub-block is zero.
    """
    index = np.empty(sub_size, dtype=np.int64)
    trial = np.empty(real_scales.size, dtype=np.int64)
    lowest, highest = level_range
    largest = 0.0
    for s in real_scales:
        if abs(s) > abs(largest):
            largest = s
    best_d, best_total = F32(0), np.inf
    if largest == 0:
        return best_d, best_total
    reach = highest if largest > 0 else -lowest
    for step in _SCALE_STEPS:
        d = round_to_fp16(F32(abs(largest) / (reach + step)))
        if not (d > 0 and np.isfinite(d)):
            continue
        total = 0.0
        for j in range(real_scales.size):
            sub = block[j * sub_size:(j + 1) * sub_size]
            sub_weight = weight[j * sub_size:(j + 1) * sub_size]
            nearest = int(np.floor(real_scales[j] / d))
            best_j = np.inf
            for level in range(max(lowest, nearest - 1), min(highest, nearest + 2) + 1):
                error = scaled_error(sub, sub_weight, levels, midpoints, uniform, F32(d * F32(level)), index)
                if error < best_j:
                    best_j, trial[j] = error, level
            total += best_j
            if total >= best_total:
                break
        if total < best_total:
            best_d, best_total = d, total
            chosen[:] = trial
    return best_d, best_total


@njit(cache=True)
def _pack_scale_only(layout, block, d, sub_levels, out):
    """One super-block in its ggml layout from d and the signed sub-block levels."""
    if layout == LAYOUT_IQ4_XS:
        iq4.store_xs_scales(d, sub_levels, out, 0)
        stored_d = load_fp16(out, 0)
        for ib in range(sub_levels.size):
            first = ib * iq4.BLOCK
            offset = iq4.XS_QS + ib * iq4.HALF_BLOCK
            iq4.store_levels(block[first:first + iq4.BLOCK], stored_d * F32(sub_levels[ib]), out, offset)
        return
    nmax = kquants_symmetric.Q3_NMAX if layout == LAYOUT_Q3_K else kquants_symmetric.Q6_NMAX
    levels = np.full(QK_K, nmax, dtype=np.int8)  # what a zero-scale sub-block keeps: level 0
    divisors = np.empty(QK_K, dtype=np.float32)
    scale_levels = np.empty(sub_levels.size, dtype=np.int8)
    if layout == LAYOUT_Q3_K:
        for j in range(sub_levels.size):
            scale_levels[j] = sub_levels[j] + kquants_symmetric.Q3_SCALE_NMAX
        kquants_symmetric.pack_q3_block(block, d, scale_levels, levels, divisors, out, 0)
    else:
        for j in range(sub_levels.size):
            scale_levels[j] = sub_levels[j]
        kquants_symmetric.pack_q6_block(block, d, scale_levels, levels, divisors, out, 0)


@njit(cache=True)
def _decode(layout, q, out):
    if layout == LAYOUT_Q3_K:
        kquants_symmetric.dequantize_row_q3_k(q, out)
    elif layout == LAYOUT_Q6_K:
        kquants_symmetric.dequantize_row_q6_k(q, out)
    else:
        iq4.dequantize_row_iq4_xs(q, out)


@njit(cache=True)
def _keep_if_better(x, weight, restored, start, candidate, decoded, out, offset):
    """Copy the candidate super-block over ggml's if its decoded values err strictly less."""
    block = x[start:start + QK_K]
    if restored_error(block, weight, decoded, 0) < restored_error(x, weight, restored, start):
        out[offset:offset + candidate.size] = candidate


@njit(cache=True)
def _improve_scale_only(x, imatrix, restored, out, layout, levels, midpoints, window, sub_size, level_range,
                        block_bytes):  # fmt: skip
    """Replace each super-block of ggml's row whose searched scales err strictly less."""
    n_sub = QK_K // sub_size
    weight = np.empty(QK_K, dtype=np.float64)
    real_scales = np.empty(n_sub, dtype=np.float64)
    sub_levels = np.empty(n_sub, dtype=np.int64)
    candidate = np.empty(block_bytes, dtype=np.uint8)
    decoded = np.empty(QK_K, dtype=np.float32)
    uniform = layout != LAYOUT_IQ4_XS
    for b in range(x.size // QK_K):
        start = b * QK_K
        block = x[start:start + QK_K]
        block_weights(imatrix, start, weight)
        _real_sub_scales(block, weight, levels, midpoints, uniform, window, sub_size, real_scales)
        d, error = _best_super_scale(block, weight, levels, midpoints, uniform, sub_size, level_range,
                                     real_scales, sub_levels)  # fmt: skip
        if not error < restored_error(x, weight, restored, start):
            continue
        _pack_scale_only(layout, block, d, sub_levels, candidate)
        _decode(layout, candidate, decoded)
        _keep_if_better(x, weight, restored, start, candidate, decoded, out, b * block_bytes)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q3_k(x, imatrix, out):
    restored = ggml_row(kquants_symmetric.quantize_row_q3_k, kquants_symmetric.dequantize_row_q3_k, x, imatrix, out)
    _improve_scale_only(x, imatrix, restored, out, LAYOUT_Q3_K, _Q3_LEVELS, _Q3_MID, _Q3_K_WINDOW,
                        kquants_symmetric.SUB, (-32, 31), _Q3_K_BYTES)  # fmt: skip


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q6_k(x, imatrix, out):
    restored = ggml_row(kquants_symmetric.quantize_row_q6_k, kquants_symmetric.dequantize_row_q6_k, x, imatrix, out)
    _improve_scale_only(x, imatrix, restored, out, LAYOUT_Q6_K, _Q6_LEVELS, _Q6_MID, _WINDOW,
                        kquants_symmetric.SUB, (-128, 127), _Q6_K_BYTES)  # fmt: skip


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq4_xs(x, imatrix, out):
    restored = ggml_row(iq4.quantize_row_iq4_xs, iq4.dequantize_row_iq4_xs, x, imatrix, out)
    _improve_scale_only(x, imatrix, restored, out, LAYOUT_IQ4_XS, _IQ4_LEVELS, _IQ4_MID, _WINDOW,
                        iq4.BLOCK, (-32, 31), _IQ4_XS_BYTES)  # fmt: skip


# ---------------------------------------------------------------- scale and min: Q2_K, Q4_K, Q5_K


@njit(cache=True)
def _affine_sub_error(x, weight, nmax, scale, minimum):
    """Σ w (x − (scale·l − minimum))² with every l the nearest of 0..nmax, in float32 as ggml decodes."""
    error = 0.0
    for i in range(x.size):
        if scale == 0:
            value = -minimum
        else:
            level = min(nmax, max(0, int(np.round((np.float64(x[i]) + minimum) / scale))))
            value = scale * F32(level) - minimum
        diff = np.float64(x[i]) - np.float64(value)
        error += weight[i] * diff * diff
    return error


@njit(cache=True)
def _best_super_scale_min(block, weight, kind, real_scales, real_mins, scale_levels, min_levels):
    """The fp16 (d, dmin) and sub-block scale and min levels of least total error over the grid.

    Returns (d, dmin, error).
    """
    n_sub = real_scales.size
    trial_scales = np.empty(n_sub, dtype=np.uint8)
    trial_mins = np.empty(n_sub, dtype=np.uint8)
    top = kind.scale_nmax
    largest_scale, largest_min = real_scales.max(), real_mins.max()
    best = (F32(0), F32(0), np.inf)
    if largest_scale == 0:
        return best
    for scale_step in _SCALE_STEPS:
        d = round_to_fp16(F32(largest_scale / (top + scale_step)))
        for min_step in _MIN_STEPS:
            dmin = round_to_fp16(F32(largest_min / (top + min_step)))
            if not (d > 0 and np.isfinite(d) and np.isfinite(dmin)):
                continue
            total = 0.0
            for j in range(n_sub):
                sub = block[j * kind.sub_size:(j + 1) * kind.sub_size]
                sub_weight = weight[j * kind.sub_size:(j + 1) * kind.sub_size]
                scale_floor = int(np.floor(real_scales[j] / d))
                min_floor = int(np.floor(real_mins[j] / dmin)) if dmin > 0 else 0
                best_j = np.inf
                for scale_level in range(max(0, scale_floor), min(top, scale_floor + 1) + 1):
                    for min_level in range(max(0, min_floor), min(top, min_floor + 1) + 1):
                        error = _affine_sub_error(
                            sub, sub_weight, kind.nmax, F32(d * F32(scale_level)), F32(dmin * F32(min_level))
                        )
                        if error < best_j:
                            best_j = error
                            trial_scales[j], trial_mins[j] = scale_level, min_level
                total += best_j
                if total >= best[2]:
                    break
            if total < best[2]:
                best = (d, dmin, total)
                scale_levels[:] = trial_scales
                min_levels[:] = trial_mins
    return best


@njit(cache=True)
def _improve_scale_min(x, imatrix, restored, out, kind):
    """Replace each super-block of ggml's row whose searched scales and mins err strictly less."""
    n_sub = QK_K // kind.sub_size
    weight = np.empty(QK_K, dtype=np.float64)
    fit_levels = np.empty(kind.sub_size, dtype=np.int64)
    fit_trial = np.empty(kind.sub_size, dtype=np.int64)
    fit_chosen = np.empty(kind.sub_size, dtype=np.int64)
    real_scales = np.empty(n_sub, dtype=np.float64)
    real_mins = np.empty(n_sub, dtype=np.float64)
    scale_levels = np.empty(n_sub, dtype=np.uint8)
    min_levels = np.empty(n_sub, dtype=np.uint8)
    levels = np.empty(QK_K, dtype=np.uint8)
    candidate = np.empty(kind.block_bytes, dtype=np.uint8)
    decoded = np.empty(QK_K, dtype=np.float32)
    for b in range(x.size // QK_K):
        start = b * QK_K
        block = x[start:start + QK_K]
        block_weights(imatrix, start, weight)
        for j in range(n_sub):
            sub = slice(j * kind.sub_size, (j + 1) * kind.sub_size)
            error, d, m = affine_fit(block[sub], weight[sub], kind.nmax, False, True, fit_levels, fit_trial, fit_chosen)
            real_scales[j], real_mins[j] = (d, -m) if np.isfinite(error) else (0.0, 0.0)
        d, dmin, error = _best_super_scale_min(block, weight, kind, real_scales, real_mins, scale_levels, min_levels)
        if not error < restored_error(x, weight, restored, start):
            continue
        levels[:] = 0
        kquants_affine.pack_super_block(block, d, dmin, scale_levels, min_levels, kind, candidate, 0, levels)
        kquants_affine.dequantize_kind_row(candidate, decoded, kind)
        _keep_if_better(x, weight, restored, start, candidate, decoded, out, b * kind.block_bytes)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q2_k(x, imatrix, out):
    restored = ggml_row(kquants_affine.quantize_row_q2_k, kquants_affine.dequantize_row_q2_k, x, imatrix, out)
    _improve_scale_min(x, imatrix, restored, out, kquants_affine.KIND_Q2_K)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q4_k(x, imatrix, out):
    restored = ggml_row(kquants_affine.quantize_row_q4_k, kquants_affine.dequantize_row_q4_k, x, imatrix, out)
    _improve_scale_min(x, imatrix, restored, out, kquants_affine.KIND_Q4_K)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q5_k(x, imatrix, out):
    restored = ggml_row(kquants_affine.quantize_row_q5_k, kquants_affine.dequantize_row_q5_k, x, imatrix, out)
    _improve_scale_min(x, imatrix, restored, out, kquants_affine.KIND_Q5_K)


# type -> its `best` quantize_row; it dequantizes with ggml's own kernel, as llama.cpp does.
KERNELS = {
    Q.Q2_K: quantize_row_q2_k,
    Q.Q3_K: quantize_row_q3_k,
    Q.Q4_K: quantize_row_q4_k,
    Q.Q5_K: quantize_row_q5_k,
    Q.Q6_K: quantize_row_q6_k,
    Q.IQ4_XS: quantize_row_iq4_xs,
}
