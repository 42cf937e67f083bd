"""Better rounding inside ggml's own block formats (`--rounding best`) for the blocks of 32.

ggml picks a block's scale by a short heuristic (the reference quantizers
without an imatrix do no search at all: Q4_0's scale is max/−8). These kernels
write the very same block layouts, so stock llama.cpp loads and dequantizes
their output unchanged, but choose each block's parameters to minimize the
error bpwopt measures and the optimizer trades, Σ w (x − x̂)² with w the
imatrix (1 without one), counting the rounding of the scale to fp16:

* scale-only types (Q4_0, Q5_0, Q8_0, IQ4_NL: x̂ = d·v[i]): an exact scan over
  the inverse scale, after llama.cpp PR #12557. As 1/d grows, each element's
  nearest level changes at known points; running sums give the least-squares
  scale of every assignment met on the way, and the best of them is the best
  real-valued scale within the scanned window. It is then rounded to fp16 (and
  its two fp16 neighbours tried) with every level re-chosen for the scale
  actually stored.
* scale-and-min types (Q4_1, Q5_1: x̂ = d·l + m): a grid of starting scales,
  each refitted by weighted least squares for (d, m) twice, with fp16 rounding.

Every row is first quantized by ggml's kernel, and a block is replaced only
where the new one has a strictly lower error, so a `best` block is never
worse than ggml's under that error and is ggml's own bytes where nothing
better was found.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, types

from bpwopt.quant.kernels import iq4, legacy
from bpwopt.quant.kernels.numerics import F32, fp16_bits_to_fp32, fp32_to_fp16_bits, round_to_fp16, store_fp16
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW

Q = GGMLQuantizationType
BLOCK = 32
_FP16_INF_BITS = 0x7C00
# The scan covers inverse scales from 0.85 to 1.1 times (largest level)/amax: on 128 off-grid rows of
# Gemma-3-270M's blk.3.ffn_down, a full scan (0 to ∞) lowered Q4_0 / Q5_0 / IQ4_NL errors by 10.4 / 10.6 /
# 7.6 %, this window by 10.3 / 10.4 / 7.5 % in half the time. Q8_0's is narrower (124/amax to 129/amax):
# a full scan would meet 32 × 255 level changes per block.
_SCAN_WINDOW = (0.85, 1.1)
_Q8_0_WINDOW = (124.0 / 128.0, 129.0 / 128.0)
# Q4_1 / Q5_1: starting inverse scales (nmax + r)/(max − min) for r = −1, −0.9, …, +1.
_AFFINE_STARTS = np.arange(-1.0, 1.0001, 0.1)
_AFFINE_REFITS = 2

# Each layout's levels (the values a block's indices stand for), and the midpoints between neighbours.
_UNIFORM_4 = np.arange(-8, 8, dtype=np.float32)
_UNIFORM_5 = np.arange(-16, 16, dtype=np.float32)
_UNIFORM_8 = np.arange(-128, 128, dtype=np.float32)
_IQ4 = iq4.KVALUES_IQ4NL.astype(np.float32)
LAYOUT_Q4_0, LAYOUT_Q5_0, LAYOUT_Q8_0, LAYOUT_IQ4_NL = range(4)


def midpoints_of(levels: np.ndarray) -> np.ndarray:
    return (levels[:-1].astype(np.float64) + levels[1:]) / 2


@njit(cache=True)
def block_weights(imatrix, start, weight):
    """The error's weights for the weight.size elements from start: the imatrix's, or 1 without one."""
    for j in range(weight.size):
        weight[j] = imatrix[start + j] if imatrix.size else 1.0


@njit(cache=True)
def nearest_level(midpoints, value, uniform):
    """Index of the level nearest to value: the number of midpoints below it (levels 1 apart: counted directly)."""
    if uniform:
        return min(max(np.ceil(value - midpoints[0]), 0.0), np.float64(midpoints.size))
    return np.searchsorted(midpoints, value)


@njit(cache=True)
def best_real_scale(y, weight, levels, midpoints, uniform, t_min, t_max, index, event_t, event_j):
    """The least-squares scale d > 0 of the best assignment y ≈ d·levels[i] met as 1/d runs over [t_min, t_max].

    Returns 0 when no assignment has a non-zero level (an all-zero block).
    index, event_t and event_j are scratch of y.size and y.size·levels.size.
    """
    sum_yv = 0.0
    sum_vv = 0.0
    count = 0
    last = levels.size - 1
    for j in range(y.size):
        i = int(nearest_level(midpoints, y[j] * t_min, uniform))
        index[j] = i
        v = np.float64(levels[i])
        sum_yv += weight[j] * y[j] * v
        sum_vv += weight[j] * v * v
        if y[j] > 0:  # level rises through the midpoints above it
            for k in range(i, last):
                t = midpoints[k] / y[j]
                if t > t_max:
                    break
                if t > t_min:
                    event_t[count] = t
                    event_j[count] = j
                    count += 1
        elif y[j] < 0:  # level falls through the midpoints below it
            for k in range(i - 1, -1, -1):
                t = midpoints[k] / y[j]
                if t > t_max:
                    break
                if t > t_min:
                    event_t[count] = t
                    event_j[count] = j
                    count += 1
    best_d = sum_yv / sum_vv if sum_vv > 0 else 0.0
    best_score = best_d * sum_yv
    for e in np.argsort(event_t[:count]):
        j = event_j[e]
        old = np.float64(levels[index[j]])
        index[j] += 1 if y[j] > 0 else -1
        new = np.float64(levels[index[j]])
        sum_yv += weight[j] * y[j] * (new - old)
        sum_vv += weight[j] * (new * new - old * old)
        if sum_vv > 0 and sum_yv * sum_yv > best_score * sum_vv:
            best_d = sum_yv / sum_vv
            best_score = best_d * sum_yv
    return best_d


@njit(cache=True)
def scaled_error(x, weight, levels, midpoints, uniform, d, index):
    """Σ w (x − d·levels[i])² with every i the nearest level to x/d (written to index), as dequantized in float32."""
    error = 0.0
    zero = int(nearest_level(midpoints, 0.0, uniform))
    for j in range(x.size):
        i = int(nearest_level(midpoints, x[j] / d, uniform)) if d != 0 else zero
        index[j] = i
        diff = np.float64(x[j]) - np.float64(levels[i] * d)
        error += weight[j] * diff * diff
    return error


@njit(cache=True)
def restored_error(x, weight, restored, start):
    """Σ w (x − x̂)² over the weight.size elements from start, x̂ the decoded values in restored."""
    error = 0.0
    for j in range(weight.size):
        diff = np.float64(x[start + j]) - np.float64(restored[start + j])
        error += weight[j] * diff * diff
    return error


@njit(cache=True)
def _pack_scaled(layout, index, d, out, offset):
    """One block in its ggml layout: fp16 d, then the indices (nibbles, plus Q5_0's fifth bits, or Q8_0's bytes)."""
    store_fp16(out, offset, d)
    if layout == LAYOUT_Q8_0:
        for j in range(BLOCK):
            out[offset + 2 + j] = np.uint8(index[j] ^ 0x80)  # index i is level i − 128, whose int8 byte is i ^ 0x80
        return
    codes = np.empty(BLOCK, dtype=np.uint8)
    for j in range(BLOCK):
        codes[j] = np.uint8(index[j])
    legacy.pack_levels(codes, out, offset + 2, layout == LAYOUT_Q5_0)


@njit(cache=True)
def _improve_scaled_blocks(x, imatrix, restored, out, layout, levels, midpoints, window, block_bytes):
    """Replace each block of ggml's row (bytes in out, values in restored) whose best scale errs strictly less."""
    weight = np.empty(BLOCK, dtype=np.float64)
    index = np.empty(BLOCK, dtype=np.int64)
    trial = np.empty(BLOCK, dtype=np.int64)
    chosen = np.empty(BLOCK, dtype=np.int64)
    event_t = np.empty(BLOCK * levels.size, dtype=np.float64)
    event_j = np.empty(BLOCK * levels.size, dtype=np.int64)
    y = np.empty(BLOCK, dtype=np.float64)
    reach = max(abs(np.float64(levels[0])), abs(np.float64(levels[-1])))  # the largest level's magnitude
    uniform = layout != LAYOUT_IQ4_NL
    for block in range(x.size // BLOCK):
        start = block * BLOCK
        x_block = x[start:start + BLOCK]
        block_weights(imatrix, start, weight)
        best_error = restored_error(x, weight, restored, start)
        best_d = F32(0)
        found = False
        amax = 0.0
        for j in range(BLOCK):
            amax = max(amax, abs(np.float64(x_block[j])))
        if amax == 0:
            continue
        t_min = window[0] * reach / amax
        t_max = window[1] * reach / amax
        for sign in (1.0, -1.0):  # d > 0, then d < 0 (the levels are not symmetric)
            for j in range(BLOCK):
                y[j] = sign * np.float64(x_block[j])
            real_d = best_real_scale(y, weight, levels, midpoints, uniform, t_min, t_max, index, event_t, event_j)
            if real_d == 0:
                continue
            bits = np.int64(fp32_to_fp16_bits(F32(sign * real_d)))
            for neighbour in (bits, bits + 1, bits - 1):
                if neighbour & 0x7FFF >= _FP16_INF_BITS or neighbour & 0x7FFF == 0:
                    continue
                d = fp16_bits_to_fp32(np.uint16(neighbour))
                error = scaled_error(x_block, weight, levels, midpoints, uniform, d, trial)
                if error < best_error:
                    best_error, best_d, found = error, d, True
                    chosen[:] = trial
        if found:
            _pack_scaled(layout, chosen, best_d, out, block * block_bytes)


@njit(cache=True)
def _affine_error(x, weight, nmax, d, m, levels):
    """Σ w (x − (d·l + m))² with every l the nearest of 0..nmax to (x − m)/d (written to levels); d ≠ 0.

    x̂ is computed in float32 as the decoders do.
    """
    error = 0.0
    for j in range(x.size):
        level = int(min(nmax, max(0.0, np.round((np.float64(x[j]) - m) / d))))
        levels[j] = level
        diff = np.float64(x[j]) - np.float64(F32(level) * F32(d) + F32(m))
        error += weight[j] * diff * diff
    return error


@njit(cache=True)
def affine_fit(x, weight, nmax, fp16, nonpositive_min, levels, trial, chosen):
    """The (error, d, m) of the best fit x ≈ d·l + m (l in 0..nmax) met from a grid of starts, each refitted
    by weighted least squares; its levels go to chosen. levels and trial are scratch of x.size.

    fp16: d and m rounded to fp16 as they are stored (Q4_1, Q5_1). nonpositive_min: m ≤ 0 and d > 0, as the
    K-quants store a min (dmin·m with m ≥ 0) to subtract. The error is infinite when nothing fits.
    """
    best_error, best_d, best_m = np.inf, 0.0, 0.0
    lo = np.float64(x.min())
    hi = np.float64(x.max())
    if nonpositive_min:
        lo = min(lo, 0.0)
    if hi == lo:
        return best_error, best_d, best_m
    for r in _AFFINE_STARTS:
        inverse_scale = (nmax + r) / (hi - lo)
        for j in range(x.size):
            levels[j] = int(min(nmax, max(0.0, np.round((np.float64(x[j]) - lo) * inverse_scale))))
        for _ in range(_AFFINE_REFITS):
            sw = sl = sll = sx = slx = 0.0
            for j in range(x.size):
                w, level, value = weight[j], np.float64(levels[j]), np.float64(x[j])
                sw += w
                sl += w * level
                sll += w * level * level
                sx += w * value
                slx += w * level * value
            det = sw * sll - sl * sl
            if not det > 0:
                break
            d = (sw * slx - sl * sx) / det
            m = (sll * sx - sl * slx) / det
            if nonpositive_min and m > 0:  # the best fit with m = 0: scale only
                d, m = slx / sll, 0.0
            if fp16:
                d, m = np.float64(round_to_fp16(F32(d))), np.float64(round_to_fp16(F32(m)))
            if not (np.isfinite(d) and np.isfinite(m)) or d == 0 or (nonpositive_min and d < 0):
                break
            error = _affine_error(x, weight, nmax, d, m, trial)
            levels[:] = trial
            if error < best_error:
                best_error, best_d, best_m = error, d, m
                chosen[:] = trial
    return best_error, best_d, best_m


@njit(cache=True)
def _improve_affine_blocks(x, imatrix, restored, out, nmax, block_bytes, has_high_bits):
    """Q4_1 / Q5_1: replace each block of ggml's row whose refitted (d, min) errs strictly less."""
    weight = np.empty(BLOCK, dtype=np.float64)
    levels = np.empty(BLOCK, dtype=np.int64)
    trial = np.empty(BLOCK, dtype=np.int64)
    chosen = np.empty(BLOCK, dtype=np.int64)
    codes = np.empty(BLOCK, dtype=np.uint8)
    for block in range(x.size // BLOCK):
        start = block * BLOCK
        block_weights(imatrix, start, weight)
        error, d, m = affine_fit(x[start:start + BLOCK], weight, nmax, True, False, levels, trial, chosen)
        if error < restored_error(x, weight, restored, start):
            offset = block * block_bytes
            store_fp16(out, offset, F32(d))
            store_fp16(out, offset + 2, F32(m))
            for j in range(BLOCK):
                codes[j] = np.uint8(chosen[j])
            legacy.pack_levels(codes, out, offset + 4, has_high_bits)


_BYTES = {qtype: GGML_QUANT_SIZES[qtype][1] for qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL)}
_Q4_0_BYTES, _Q4_1_BYTES, _Q5_0_BYTES = _BYTES[Q.Q4_0], _BYTES[Q.Q4_1], _BYTES[Q.Q5_0]
_Q5_1_BYTES, _Q8_0_BYTES, _IQ4_NL_BYTES = _BYTES[Q.Q5_1], _BYTES[Q.Q8_0], _BYTES[Q.IQ4_NL]
_MID_4, _MID_5, _MID_8, _MID_IQ4 = (midpoints_of(levels) for levels in (_UNIFORM_4, _UNIFORM_5, _UNIFORM_8, _IQ4))
_WINDOW = np.array(_SCAN_WINDOW)
_Q8_WINDOW = np.array(_Q8_0_WINDOW)


@njit(
    types.float32[::1](
        types.FunctionType(QUANTIZE_ROW), types.FunctionType(DEQUANTIZE_ROW),
        types.float32[::1], types.float32[::1], types.uint8[::1],
    ),
    cache=True,
)  # fmt: skip
def ggml_row(quantize_row, dequantize_row, x, imatrix, out):
    """ggml's bytes of the row into out, and the values they decode to: what each block must beat."""
    quantize_row(x, imatrix, out)
    restored = np.empty(x.size, dtype=np.float32)
    dequantize_row(out, restored)
    return restored


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q4_0(x, imatrix, out):
    restored = ggml_row(legacy.quantize_row_q4_0, legacy.dequantize_row_q4_0, x, imatrix, out)
    _improve_scaled_blocks(x, imatrix, restored, out, LAYOUT_Q4_0, _UNIFORM_4, _MID_4, _WINDOW, _Q4_0_BYTES)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q5_0(x, imatrix, out):
    restored = ggml_row(legacy.quantize_row_q5_0, legacy.dequantize_row_q5_0, x, imatrix, out)
    _improve_scaled_blocks(x, imatrix, restored, out, LAYOUT_Q5_0, _UNIFORM_5, _MID_5, _WINDOW, _Q5_0_BYTES)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q8_0(x, imatrix, out):
    restored = ggml_row(legacy.quantize_row_q8_0, legacy.dequantize_row_q8_0, x, imatrix, out)
    _improve_scaled_blocks(x, imatrix, restored, out, LAYOUT_Q8_0, _UNIFORM_8, _MID_8, _Q8_WINDOW, _Q8_0_BYTES)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_iq4_nl(x, imatrix, out):
    restored = ggml_row(iq4.quantize_row_iq4_nl, iq4.dequantize_row_iq4_nl, x, imatrix, out)
    _improve_scaled_blocks(x, imatrix, restored, out, LAYOUT_IQ4_NL, _IQ4, _MID_IQ4, _WINDOW, _IQ4_NL_BYTES)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q4_1(x, imatrix, out):
    restored = ggml_row(legacy.quantize_row_q4_1, legacy.dequantize_row_q4_1, x, imatrix, out)
    _improve_affine_blocks(x, imatrix, restored, out, 15, _Q4_1_BYTES, False)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q5_1(x, imatrix, out):
    restored = ggml_row(legacy.quantize_row_q5_1, legacy.dequantize_row_q5_1, x, imatrix, out)
    _improve_affine_blocks(x, imatrix, restored, out, 31, _Q5_1_BYTES, True)


# type -> its `best` quantize_row; it dequantizes with ggml's own kernel, as llama.cpp does.
KERNELS = {
    Q.Q4_0: quantize_row_q4_0,
    Q.Q4_1: quantize_row_q4_1,
    Q.Q5_0: quantize_row_q5_0,
    Q.Q5_1: quantize_row_q5_1,
    Q.Q8_0: quantize_row_q8_0,
    Q.IQ4_NL: quantize_row_iq4_nl,
}
