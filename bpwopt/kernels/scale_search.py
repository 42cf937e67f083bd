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

from bpwopt.kernels.numerics import F32, GROUP_MAX_EPS, ONE, ZERO, nearest_int

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
def _signed_max(x):
    """The element of largest magnitude (first one on ties) and that magnitude."""
    amax = ZERO
    max_value = ZERO
    for value in x:
        if abs(value) > amax:
            amax = abs(value)
            max_value = value
    return max_value, amax


@njit(cache=True)
def make_qx_quants(nmax, x, L, rmse_type, weights):
    """Symmetric quantization to levels -nmax..nmax-1; writes L (int8, offset by nmax), returns the scale."""
    n = x.size
    max_value, amax = _signed_max(x)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return ZERO
    fnmax = F32(nmax)
    iscale = -fnmax / max_value
    if rmse_type == 0:
        for i in range(n):
            level = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, level))
        return ONE / iscale
    return_early = rmse_type < 0
    if return_early:
        rmse_type = -rmse_type
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        level = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = level + nmax
        w = _rmse_weight(x, weights, i, rmse_type)
        fl = F32(level)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != ZERO else ZERO
    if return_early:
        return F32(0.5) * (scale + ONE / iscale) if suml2 > ZERO else ONE / iscale
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fnmax + _TENTH * F32(step)) / max_value
        sumlx = ZERO
        suml2 = ZERO
        for i in range(n):
            fl = F32(max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))))
            w = _rmse_weight(x, weights, i, rmse_type)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > ZERO and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True)
def make_q3_quants(nmax, x, L, do_rmse):
    """Q3_K's reference search: greedy per-element level moves weighted by x²."""
    n = x.size
    max_value, amax = _signed_max(x)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return ZERO
    iscale = -F32(nmax) / max_value
    if not do_rmse:
        for i in range(n):
            L[i] = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i]))) + nmax
        return ONE / iscale
    sumlx = ZERO
    suml2 = ZERO
    for i in range(n):
        level = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = level
        w = x[i] * x[i]
        fl = F32(level)
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


@njit(cache=True)
def _affine_error(x, weights, L, scale, offset, use_mad):
    """Σ w·|scale·L + offset − x|  (or squared), in float32 like the C loops."""
    total = ZERO
    for i in range(x.size):
        diff = scale * F32(L[i]) + offset - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = weights[i] if weights.size else x[i] * x[i]
        total += w * diff
    return total


@njit(cache=True)
def _make_affine_quants(nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, strict_range):
    """Shared body of make_qkx2_quants / make_qkx3_quants: levels 0..nmax, scale and min.

    Returns (scale, the_min) where x ≈ scale·L − the_min. `strict_range` selects
    qkx3's `max <= min` test over qkx2's `max == min`.
    """
    n = x.size
    min_value = x[0]
    max_value = x[0]
    sum_w = weights[0] if weights.size else x[0] * x[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_value:
            min_value = x[i]
        if x[i] > max_value:
            max_value = x[i]
        w = weights[i] if weights.size else x[i] * x[i]
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
            w = weights[i] if weights.size else x[i] * x[i]
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


@njit(cache=True)
def make_qkx2_quants(nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """ggml's make_qkx2_quants (weights required); returns (scale, the_min)."""
    return _make_affine_quants(nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, False)


@njit(cache=True)
def make_qkx3_quants(nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """ggml's make_qkx3_quants (empty weights mean x²); returns (scale, the_min)."""
    return _make_affine_quants(nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, True)


@njit(cache=True)
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


@njit(cache=True)
def best_index_int8(values, x):
    """Index of the entry of the sorted int8 table `values` nearest to x (ggml's best_index_int8)."""
    n = values.size
    if x <= F32(values[0]):
        return 0
    if x >= F32(values[n - 1]):
        return n - 1
    lo = 0
    hi = n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < F32(values[mid]):
            hi = mid
        else:
            lo = mid
    return lo if x - F32(values[lo]) < F32(values[hi]) - x else hi


def scratch_levels(n: int, signed: bool) -> np.ndarray:
    """A level buffer of the C code's element type (int8 or uint8)."""
    return np.zeros(n, dtype=np.int8 if signed else np.uint8)
