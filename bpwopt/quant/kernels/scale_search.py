"""Scale searches shared by the legacy, K-quant and IQ4 quantizers.

ggml picks each block's scale (and min) by a small search over candidate
scales, minimizing a weighted squared error; the weights are the importance
matrix scaled by the local signal when one is given. These are Numba
reimplementations of `make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`,
`make_qkx3_quants` and `make_qp_quants` from ggml-quants.c, written so that
every operation happens in float32 in the same order as the C code.

Convention: an empty `weights` array stands for C's NULL pointer.
"""

import math

import numpy as np
from numba import njit

from bpwopt.quant.kernels.numerics import F32, GROUP_MAX_EPS, ONE, ZERO, nearest_int, nearest_int_float

_TENTH = F32(0.1)


@njit(cache=True)
def _rmse_weight(x, weights, i, rmse_type):
    if weights.size:
        return weights[i]
    value = x[i]
    if rmse_type == 1:
        return value * value
    if rmse_type == 2:
        return ONE
    if rmse_type == 3:
        return abs(value)
    return F32(math.sqrt(abs(value)))


@njit(cache=True)
def signed_max(x):
    """The element of largest magnitude (first one on ties, NaNs skipped) and that magnitude.

    ggml picks block maxima and super-block scales this way everywhere: the sign
    of the extreme element matters, so it is kept.
    """
    amax = ZERO
    max_value = ZERO
    for value in x:
        if abs(value) > amax:
            amax = abs(value)
            max_value = value
    return max_value, amax


@njit(cache=True)
def _bounded_level(scaled, nmax):
    """clamp(nearest_int(scaled), −nmax, nmax−1) as a float32, computed in float only.

    Valid for |scaled| < 2**22, where the clamp can go before the rounding; a
    NaN gives level 0, as nearest_int does. That covers iscale·x whenever no
    |x| exceeds the max that set iscale. Without integer round trips and
    branches, the loops calling this vectorize.
    """
    low = F32(-nmax)
    high = F32(nmax - 1)
    scaled = low if scaled < low else scaled
    scaled = high if scaled > high else scaled
    level = nearest_int_float(scaled)
    return level if level == level else ZERO


# make_qx_quants tries ggml's first guess −nmax/max, then −(nmax + 0.1·step)/max for step = −9..9, step ≠ 0.
_QX_CANDIDATES = 19
_QX_LANES = 24  # the candidates padded to a multiple of the SIMD width


@njit(cache=True)
def _qx_candidate_iscales(nmax, max_value, iscales):
    """The inverse scales make_qx_quants tries, in ggml's order; padding lanes repeat the last one."""
    fnmax = F32(nmax)
    iscales[0] = -fnmax / max_value
    for k in range(1, iscales.size):
        candidate = min(k, _QX_CANDIDATES - 1)
        step = candidate - 10 if candidate < 10 else candidate - 9
        iscales[k] = -(fnmax + _TENTH * F32(step)) / max_value


@njit(cache=True)
def _qx_candidate_sums(nmax, x, weights, rmse_type, iscales, sumlx, suml2):
    """Σ w·x·l and Σ w·l² of every candidate scale, in one pass over x.

    Each candidate still accumulates element by element in ggml's order, but
    the candidates sit side by side, so LLVM vectorizes across them.
    """
    sumlx[:] = ZERO
    suml2[:] = ZERO
    for i in range(x.size):
        w = _rmse_weight(x, weights, i, rmse_type)
        value = x[i]
        wx = w * value
        for k in range(iscales.size):
            level = _bounded_level(iscales[k] * value, nmax)
            sumlx[k] += wx * level
            suml2[k] += w * level * level


@njit(cache=True)
def _qx_levels(nmax, x, iscale, L):
    for i in range(x.size):
        L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))


@njit(cache=True)
def make_qx_quants(nmax, x, L, rmse_type, weights):
    """Symmetric quantization to levels -nmax..nmax-1; writes L (int8, offset by nmax), returns the scale.

    The 19 candidate scales are scored together (see _qx_candidate_sums), then
    compared in ggml's order, so the choice is ggml's.
    """
    max_value, amax = signed_max(x)
    if amax < GROUP_MAX_EPS:
        L[:] = 0
        return ZERO
    if rmse_type == 0:
        iscale = -F32(nmax) / max_value
        _qx_levels(nmax, x, iscale, L)
        return ONE / iscale
    search = np.empty((3, _QX_LANES), dtype=np.float32)
    iscales, sumlx, suml2 = search[0], search[1], search[2]
    _qx_candidate_iscales(nmax, max_value, iscales)
    _qx_candidate_sums(nmax, x, weights, abs(rmse_type), iscales, sumlx, suml2)
    scale = sumlx[0] / suml2[0] if suml2[0] != ZERO else ZERO
    if rmse_type < 0:
        _qx_levels(nmax, x, iscales[0], L)
        return F32(0.5) * (scale + ONE / iscales[0]) if suml2[0] > ZERO else ONE / iscales[0]
    best = scale * sumlx[0]
    chosen = 0
    for k in range(1, _QX_CANDIDATES):
        if suml2[k] > ZERO and sumlx[k] * sumlx[k] > best * suml2[k]:
            scale = sumlx[k] / suml2[k]
            best = scale * sumlx[k]
            chosen = k
    _qx_levels(nmax, x, iscales[chosen], L)
    return scale


@njit(cache=True)
def make_q3_quants(nmax, x, L, do_rmse):
    """Q3_K's reference search: greedy per-element level moves weighted by x²."""
    n = x.size
    max_value, amax = signed_max(x)
    if amax < GROUP_MAX_EPS:
        L[:] = 0
        return ZERO
    iscale = -F32(nmax) / max_value
    if not do_rmse:
        _qx_levels(nmax, x, iscale, L)
        return ONE / iscale
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        fl = _bounded_level(iscale * x[i], nmax)
        L[i] = np.int8(fl)
        w = x[i] * x[i]
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            fl = F32(L[i])
            slx = sumlx - w * x[i] * fl
            if slx > ZERO:
                sl2 = suml2 - w * fl * fl
                new_level = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new_level != L[i]:
                    fnew = F32(new_level)
                    slx += w * x[i] * fnew
                    sl2 += w * fnew * fnew
                    if sl2 > ZERO and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_level
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > ZERO else ZERO


@njit(cache=True, inline="always")
def _affine_residual(scale, level, offset, value, use_mad):
    """|scale·level + offset − value| (or its square), in float32 in the C loops' order."""
    diff = scale * level + offset - value
    return abs(diff) if use_mad else diff * diff


@njit(cache=True, inline="always")  # called twice per search step: a call costs ~5%
def _affine_error(x, weights, L, scale, offset, use_mad):
    """Σ w·|scale·L + offset − x|  (or squared), in float32 like the C loops."""
    total = ZERO
    for i in range(x.size):
        total += weights[i] * _affine_residual(scale, F32(L[i]), offset, x[i], use_mad)
    return total


@njit(cache=True, error_model="numpy")  # x/0 gives ±inf or NaN as in C, not ZeroDivisionError
def _make_affine_quants(nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, strict_range):
    """ggml's make_qkx2_quants / make_qkx3_quants on one run of x: levels 0..nmax, scale and min.

    Returns (scale, the_min) where x ≈ scale·L − the_min. `strict_range` selects
    qkx3's `max <= min` test over qkx2's `max == min`. `weights` must hold one
    weight per element: a "no weights" test inside the loops keeps LLVM from
    optimizing them and costs about a quarter of the time on 16-element blocks.
    """
    n = x.size
    min_value = x[0]
    max_value = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_value:
            min_value = x[i]
        if x[i] > max_value:
            max_value = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if min_value > ZERO:
        min_value = ZERO
    flat = max_value <= min_value if strict_range else max_value == min_value
    if flat:
        for i in range(n):
            L[i] = 0
        return ZERO, -min_value
    fnmax = F32(nmax)
    iscale = fnmax / (max_value - min_value)
    scale = ONE / iscale
    for i in range(n):
        L[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - min_value))))
    best_error = _affine_error(x, weights, L, scale, min_value, use_mad)
    if nstep < 1:
        return scale, -min_value
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + fnmax) / (max_value - min_value)
        sum_l = ZERO
        sum_l2 = ZERO
        sum_xl = ZERO
        for i in range(n):
            level = max(0, min(nmax, nearest_int(iscale * (x[i] - min_value))))
            Laux[i] = level
            w = weights[i]
            fl = F32(level)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > ZERO:
                this_min = ZERO
                this_scale = sum_xl / sum_l2
            error = _affine_error(x, weights, Laux, this_scale, this_min, use_mad)
            if error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = error
                scale = this_scale
                min_value = this_min
    return scale, -min_value


# Exact bound of nearest_int_float: below it the float rounding is ggml's nearest_int.
_ROUNDING_LIMIT = F32(4194304.0)  # 2**22
_INF = np.float32(np.inf)
# Rows of the per-group scratch of _affine_quants_groups.
_LOW, _HIGH, _SUM_W, _SUM_X, _SCALE, _BEST, _ISCALE, _SUM_L, _SUM_L2, _SUM_XL, _DET, _TRY_SCALE, _TRY_MIN, _ERROR, \
    _KEPT, _LARGEST, _FIRST_LOW = range(17)
_GROUP_ROWS = _FIRST_LOW + 1


@njit(cache=True, inline="always")
def _affine_level(scaled, fnmax):
    """max(0, min(nmax, nearest_int(scaled))) as a float32 where |scaled| < 2**22 or scaled is not finite.

    ggml's nearest_int maps ±inf and NaN to levels that the clamp turns into 0; so does this.
    """
    scaled = scaled if scaled < _ROUNDING_LIMIT else ZERO
    scaled = fnmax if scaled > fnmax else scaled
    scaled = ZERO if scaled < ZERO else scaled
    return nearest_int_float(scaled)


@njit(cache=True, inline="always")
def _finite_magnitude(scaled):
    """|scaled| where finite, else 0: what decides whether _affine_level was exact."""
    magnitude = abs(scaled)
    return magnitude if magnitude < _INF else ZERO


@njit(cache=True, error_model="numpy")  # x/0 gives ±inf or NaN as in C, not ZeroDivisionError
def _affine_quants_groups(
    nmax, x, weights, levels, scales, mins, aux, lanes, rmin, rdelta, nstep, use_mad, strict_range
):
    """_make_affine_quants on many independent groups at once; False where it could not be exact.

    x[i, g] and weights[i, g] are element i of group g (the groups innermost, so every loop below
    vectorizes across them); each group runs ggml's sequence on its own, its min moving with each
    better step, as in the one-group search. On return levels[i, g] (float32) hold the levels,
    scales[g] and mins[g] what make_qkx2/3_quants return (x ≈ scale·level − min). lanes is float32
    (_GROUP_ROWS, groups) scratch; aux is shaped like x. It returns False when some scaled value
    reached 2**22, where ggml's integer rounding wraps (seen only with exact-zero importances and
    weights spread over decades): the caller then runs the one-group search.
    """
    n, groups = x.shape
    fnmax = F32(nmax)
    low, high, sum_w, sum_x = lanes[_LOW], lanes[_HIGH], lanes[_SUM_W], lanes[_SUM_X]
    scale, best, iscale, largest = lanes[_SCALE], lanes[_BEST], lanes[_ISCALE], lanes[_LARGEST]
    sum_l, sum_l2, sum_xl = lanes[_SUM_L], lanes[_SUM_L2], lanes[_SUM_XL]
    det, try_scale, try_min, error, kept = lanes[_DET], lanes[_TRY_SCALE], lanes[_TRY_MIN], lanes[_ERROR], lanes[_KEPT]
    for g in range(groups):
        low[g] = x[0, g]
        high[g] = x[0, g]
        sum_w[g] = weights[0, g]
        sum_x[g] = sum_w[g] * x[0, g]
    for i in range(1, n):
        for g in range(groups):
            value = x[i, g]
            low[g] = value if value < low[g] else low[g]
            high[g] = value if value > high[g] else high[g]
            w = weights[i, g]
            sum_w[g] += w
            sum_x[g] += w * value
    for g in range(groups):
        low[g] = ZERO if low[g] > ZERO else low[g]
        lanes[_FIRST_LOW, g] = low[g]
        iscale[g] = fnmax / (high[g] - low[g])
        scale[g] = ONE / iscale[g]
        best[g] = ZERO
        largest[g] = ZERO
    for i in range(n):
        for g in range(groups):
            scaled = iscale[g] * (x[i, g] - low[g])
            largest[g] = max(largest[g], _finite_magnitude(scaled))
            level = _affine_level(scaled, fnmax)
            levels[i, g] = level
            best[g] += weights[i, g] * _affine_residual(scale[g], level, low[g], x[i, g], use_mad)
    for step in range(nstep + 1 if nstep >= 1 else 0):
        numerator = rmin + rdelta * F32(step) + fnmax
        for g in range(groups):
            iscale[g] = numerator / (high[g] - low[g])
            sum_l[g] = ZERO
            sum_l2[g] = ZERO
            sum_xl[g] = ZERO
        for i in range(n):
            for g in range(groups):
                value = x[i, g]
                scaled = iscale[g] * (value - low[g])
                largest[g] = max(largest[g], _finite_magnitude(scaled))
                level = _affine_level(scaled, fnmax)
                aux[i, g] = level
                w = weights[i, g]
                sum_l[g] += w * level
                sum_l2[g] += w * level * level
                sum_xl[g] += w * level * value
        for g in range(groups):
            det[g] = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g]
            this_scale = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / det[g]
            this_min = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / det[g]
            clamped = this_min > ZERO
            try_scale[g] = sum_xl[g] / sum_l2[g] if clamped else this_scale
            try_min[g] = ZERO if clamped else this_min
            error[g] = ZERO
        for i in range(n):
            for g in range(groups):
                error[g] += weights[i, g] * _affine_residual(try_scale[g], aux[i, g], try_min[g], x[i, g], use_mad)
        for g in range(groups):
            better = det[g] > ZERO and error[g] < best[g]
            best[g] = error[g] if better else best[g]
            scale[g] = try_scale[g] if better else scale[g]
            low[g] = try_min[g] if better else low[g]
            kept[g] = ONE if better else ZERO
        for i in range(n):
            for g in range(groups):
                levels[i, g] = aux[i, g] if kept[g] > ZERO else levels[i, g]
    exact = True
    for g in range(groups):
        first_low = lanes[_FIRST_LOW, g]
        if high[g] <= first_low if strict_range else high[g] == first_low:  # ggml returns before searching
            scale[g] = ZERO
            low[g] = first_low
            for i in range(n):
                levels[i, g] = ZERO
        elif largest[g] >= _ROUNDING_LIMIT:
            exact = False
        scales[g] = scale[g]
        mins[g] = -low[g]
    return exact


@njit(cache=True)
def affine_quants_row(nmax, x, weights, size, levels, scales, mins, rmin, rdelta, nstep, use_mad, strict_range):
    """ggml's make_qkx2_quants (strict_range False) or make_qkx3_quants on each run of `size` elements of x.

    weights holds one weight per element of x; levels (uint8, like x) and scales, mins (float32, one
    per run) are written. The runs are searched side by side (_affine_quants_groups), and one at a
    time only where that could not be exact.
    """
    n_groups = x.size // size
    values_t = np.empty((size, n_groups), dtype=np.float32)
    weights_t = np.empty((size, n_groups), dtype=np.float32)
    levels_t = np.empty((size, n_groups), dtype=np.float32)
    aux_t = np.empty((size, n_groups), dtype=np.float32)
    lanes = np.empty((_GROUP_ROWS, n_groups), dtype=np.float32)
    for g in range(n_groups):
        for i in range(size):
            values_t[i, g] = x[g * size + i]
            weights_t[i, g] = weights[g * size + i]
    exact = _affine_quants_groups(nmax, values_t, weights_t, levels_t, scales, mins, aux_t, lanes,
                                 rmin, rdelta, nstep, use_mad, strict_range)  # fmt: skip
    if exact:
        for g in range(n_groups):
            for i in range(size):
                levels[g * size + i] = np.uint8(levels_t[i, g])
        return
    aux = np.empty(size, dtype=np.uint8)
    for g in range(n_groups):
        run = slice(g * size, (g + 1) * size)
        scales[g], mins[g] = _make_affine_quants(nmax, x[run], weights[run], levels[run], aux,
                                                 rmin, rdelta, nstep, use_mad, strict_range)  # fmt: skip


@njit(cache=True, error_model="numpy")  # x/0 gives ±inf or NaN as in C, not ZeroDivisionError
def make_qp_quants(nmax, x, L, weights):
    """Positive-only levels 0..nmax for the super-block scales of Q2_K/Q4_K/Q5_K with an imatrix."""
    n = x.size
    max_value = ZERO
    for value in x:
        max_value = max(max_value, value)
    if max_value < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return ZERO
    fnmax = F32(nmax)
    iscale = fnmax / max_value
    for i in range(n):
        L[i] = nearest_int(iscale * x[i])
    scale = ONE / iscale
    best_mse = ZERO
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best_mse += weights[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_step = (_TENTH * F32(step) + fnmax) / max_value
        scale_step = ONE / iscale_step
        mse = ZERO
        for i in range(n):
            level = min(nmax, nearest_int(iscale_step * x[i]))
            diff = x[i] - scale_step * F32(level)
            mse += weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_step
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        level = min(nmax, nearest_int(iscale * x[i]))
        L[i] = level
        fl = F32(level)  # C sums the int level; L (uint8) keeps only its low byte
        sumlx += weights[i] * x[i] * fl
        suml2 += weights[i] * fl * fl
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = weights[i]
            fl = F32(L[i])
            slx = sumlx - w * x[i] * fl
            sl2 = suml2 - w * fl * fl
            if slx > ZERO and sl2 > ZERO:
                new_level = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_level != L[i]:
                    fnew = F32(new_level)
                    slx += w * x[i] * fnew
                    sl2 += w * fnew * fnew
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_level
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > ZERO else ZERO


def scratch_levels(n: int, signed: bool) -> np.ndarray:
    """A level buffer of the C code's element type (int8 or uint8)."""
    return np.zeros(n, dtype=np.int8 if signed else np.uint8)
