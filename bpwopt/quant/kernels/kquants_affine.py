"""Affine K-quants: Q2_K, Q4_K and Q5_K (super-blocks of QK_K = 256 elements).

Each sub-block (16 elements for Q2_K, 32 for Q4_K and Q5_K) is fitted as
x ≈ scale·level − min with levels 0..nmax. The sub-block scales and mins are
then quantized themselves, to 4 bits (Q2_K) or 6 bits (Q4_K, Q5_K), against two
fp16 super-block values `d` and `dmin`; finally every element is re-quantized
against the scale and min the decoder will actually see.

Without an imatrix ggml runs `quantize_row_q*_K_ref`: make_qkx2_quants with
per-type weights and step grids, sub-block scales taken relative to the largest.
With one it runs `quantize_row_q*_K_impl`: make_qkx3_quants weighted by
imatrix·sqrt(σ² + x²), then make_qp_quants for the super-block values. The three
types differ only in the constants of `_KQuant`. Byte layouts are ggml's
`block_q2_K`, `block_q4_K` and `block_q5_K`.
"""

from typing import NamedTuple

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from bpwopt.quant.kernels.numerics import F32, ZERO, load_fp16, nearest_int, store_fp16, sum_of_squares
from bpwopt.quant.kernels.rows import DEQUANTIZE_ROW, QUANTIZE_ROW
from bpwopt.quant.kernels.scale_search import affine_quants_row, make_qp_quants

QK_K, _Q2_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K]
_Q4_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][1]
_Q5_K_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K][1]
_LANES = 32  # byte l of a group of packed levels holds elements l, l+32, l+64, ...
_D_DMIN_BYTES = 4  # fp16 d, then fp16 dmin
_K_SCALE_SIZE = 12  # bytes of eight 6-bit scales and eight 6-bit mins

# make_qkx2_quants step grid of the reference path (its rmin and nstep depend on the type)
_REF_RDELTA = F32(0.1)
# make_qkx3_quants step grid of the imatrix path, the same for all three types
_IMATRIX_RMIN = F32(-0.9)
_IMATRIX_RDELTA = F32(0.05)
_IMATRIX_NSTEP = 36


class _KQuant(NamedTuple):
    """What tells Q2_K, Q4_K and Q5_K apart: block layout and the literals of ggml's search."""

    block_bytes: int
    sub_size: int  # elements per sub-block (one scale and one min each)
    nmax: int  # element levels 0..nmax
    scale_nmax: int  # sub-block scale and min levels 0..scale_nmax
    d: int  # offset of fp16 d, followed by fp16 dmin
    scales: int  # offset of the packed sub-block scales and mins
    six_bit_scales: bool  # 12 bytes as get_scale_min_k4 reads them; else one byte, scale | min << 4
    qs: int  # offset of the low bits of the levels
    qs_bits: int  # level bits stored in qs
    qh: int  # offset of the fifth bit of each level, or -1
    ref_rmin: np.float32  # reference path: make_qkx2_quants(rmin, 0.1, nstep, use_mad)
    ref_nstep: int
    ref_use_mad: bool
    ref_rms_weights: bool  # reference weights |x| + rms of the sub-block, else |x|
    sigma2_factor: np.float32  # imatrix path: σ² = factor · mean(x²) over the super-block
    # Whether C applies MIN(scale_nmax, .) to the uint8 scale and min levels, per path. It
    # matters: a negative sub-block scale wraps to a level ≥ 193, which Q5_K's imatrix
    # path clamps to 63 while Q4_K's and Q2_K's let its high bits spill into the packing.
    clamp_ref_scales: bool
    clamp_imatrix_scales: bool


# block_q2_K: scales[QK_K/16], qs[QK_K/4], d, dmin
KIND_Q2_K = _KQuant(
    block_bytes=_Q2_K_BYTES,
    sub_size=16,
    nmax=3,
    scale_nmax=15,
    d=QK_K // 16 + QK_K // 4,
    scales=0,
    six_bit_scales=False,
    qs=QK_K // 16,
    qs_bits=2,
    qh=-1,
    ref_rmin=F32(-0.5),
    ref_nstep=15,
    ref_use_mad=True,
    ref_rms_weights=False,
    sigma2_factor=F32(1.0),
    clamp_ref_scales=False,
    clamp_imatrix_scales=False,
)
# block_q4_K: d, dmin, scales[12], qs[QK_K/2]
KIND_Q4_K = _KQuant(
    block_bytes=_Q4_K_BYTES,
    sub_size=32,
    nmax=15,
    scale_nmax=63,
    d=0,
    scales=_D_DMIN_BYTES,
    six_bit_scales=True,
    qs=_D_DMIN_BYTES + _K_SCALE_SIZE,
    qs_bits=4,
    qh=-1,
    ref_rmin=F32(-1.0),
    ref_nstep=20,
    ref_use_mad=False,
    ref_rms_weights=True,
    sigma2_factor=F32(2.0),
    clamp_ref_scales=True,
    clamp_imatrix_scales=False,
)
# block_q5_K: d, dmin, scales[12], qh[QK_K/8], qs[QK_K/2]
KIND_Q5_K = KIND_Q4_K._replace(
    block_bytes=_Q5_K_BYTES,
    nmax=31,
    qs=_D_DMIN_BYTES + _K_SCALE_SIZE + QK_K // 8,
    qh=_D_DMIN_BYTES + _K_SCALE_SIZE,
    ref_rmin=F32(-0.5),
    ref_nstep=15,
    clamp_imatrix_scales=True,
)


# ---------------------------------------------------------------- sub-block fits


@njit(cache=True)
def _reference_weights(values, add_rms, weights):
    """The reference path's weights: |x|, plus the sub-block's rms for Q4_K and Q5_K."""
    rms = np.sqrt(sum_of_squares(values) / F32(values.size)) if add_rms else ZERO
    for i in range(values.size):
        weights[i] = rms + abs(values[i])


@njit(cache=True)
def _imatrix_weights(values, importance, sigma2, weights):
    """The imatrix path's weights imatrix·sqrt(σ² + x²); returns their sum."""
    total = ZERO
    for i in range(values.size):
        weights[i] = importance[i] * np.sqrt(sigma2 + values[i] * values[i])
        total += weights[i]
    return total


@njit(cache=True)
def _fit_sub_blocks(x, imatrix, kind, levels, weights, sub_scales, sub_mins, sub_weights):
    """Scale, min and levels of every sub-block of the row x; on the imatrix path also each one's total weight."""
    size = kind.sub_size
    per_block = QK_K // size
    for g in range(sub_scales.size):
        sub = slice(g * size, (g + 1) * size)
        if imatrix.size:
            if g % per_block == 0:
                sigma2 = kind.sigma2_factor * sum_of_squares(x[g * size:g * size + QK_K]) / F32(QK_K)
            sub_weights[g] = _imatrix_weights(x[sub], imatrix[sub], sigma2, weights[sub])
        else:
            _reference_weights(x[sub], kind.ref_rms_weights, weights[sub])
    if imatrix.size:
        affine_quants_row(kind.nmax, x, weights, size, levels, sub_scales, sub_mins,
                          _IMATRIX_RMIN, _IMATRIX_RDELTA, _IMATRIX_NSTEP, False, True)  # fmt: skip
    else:
        affine_quants_row(kind.nmax, x, weights, size, levels, sub_scales, sub_mins,
                          kind.ref_rmin, _REF_RDELTA, kind.ref_nstep, kind.ref_use_mad, False)  # fmt: skip


# ---------------------------------------------------------------- sub-block scales and mins


@njit(cache=True)
def _relative_to_largest(values, nmax, levels):
    """Reference path: levels nmax·v/largest, kept to their low byte as C's uint8_t does.

    Returns the super-block value largest/nmax (zero when no value is positive).
    """
    largest = ZERO
    for value in values:
        if value > largest:
            largest = value
    inverse = F32(nmax) / largest if largest > ZERO else ZERO
    for j in range(values.size):
        levels[j] = nearest_int(inverse * values[j]) & 0xFF
    return largest / F32(nmax)


@njit(cache=True)
def _quantize_sub_values(values, sub_weights, use_imatrix, nmax, clamp, levels):
    """Levels 0..nmax of the sub-block scales (or mins); returns the super-block value that multiplies them."""
    if use_imatrix:
        super_value = make_qp_quants(nmax, values, levels, sub_weights)
    else:
        super_value = _relative_to_largest(values, nmax, levels)
    if clamp:
        for j in range(levels.size):
            levels[j] = min(nmax, levels[j])
    return super_value


@njit(cache=True)
def _pack_scales(scale_levels, min_levels, kind, out, offset):
    """Store the sub-block scale and min levels; bits above the field width spill as they do in C.

    Q2_K: byte j = scale | min << 4. Q4_K/Q5_K: for j < 4 byte j holds the scale and
    byte j+4 the min; for j ≥ 4 byte j+4 holds both low nibbles and the top two bits
    go to bits 6-7 of bytes j−4 (scale) and j (min).
    """
    if not kind.six_bit_scales:
        for j in range(scale_levels.size):
            out[offset + j] = (np.int64(scale_levels[j]) | (np.int64(min_levels[j]) << 4)) & 0xFF
        return
    for j in range(4):
        out[offset + j] = scale_levels[j]
        out[offset + j + 4] = min_levels[j]
    for j in range(4, 8):
        scale_level = np.int64(scale_levels[j])
        min_level = np.int64(min_levels[j])
        out[offset + j + 4] = (scale_level & 0x0F) | ((min_level & 0x0F) << 4)
        out[offset + j - 4] = (np.int64(out[offset + j - 4]) | ((scale_level >> 4) << 6)) & 0xFF
        out[offset + j] = (np.int64(out[offset + j]) | ((min_level >> 4) << 6)) & 0xFF


@njit(cache=True)
def _sub_block_scale_min(row, offset, j, six_bit_scales):
    """(scale level, min level) of sub-block j as the decoder reads them (get_scale_min_k4 for 6 bits)."""
    if not six_bit_scales:
        packed = np.int64(row[offset + j])
        return packed & 0x0F, packed >> 4
    if j < 4:
        return np.int64(row[offset + j]) & 63, np.int64(row[offset + j + 4]) & 63
    low_nibbles = np.int64(row[offset + j + 4])
    scale_level = (low_nibbles & 0x0F) | ((np.int64(row[offset + j - 4]) >> 6) << 4)
    min_level = (low_nibbles >> 4) | ((np.int64(row[offset + j]) >> 6) << 4)
    return scale_level, min_level


# ---------------------------------------------------------------- levels


@njit(cache=True, error_model="numpy")  # no per-element ZeroDivisionError test
def _requantize(block, row, offset, kind, levels):
    """Levels against the decoded sub-block scale d·sc and min dmin·m, clamped to 0..nmax.

    This is what makes the bytes consistent with the fp16 super-block values.
    A sub-block whose decoded scale is zero keeps the levels of the search, as in ggml.
    """
    d = load_fp16(row, offset + kind.d)
    dmin = load_fp16(row, offset + kind.d + 2)
    for j in range(QK_K // kind.sub_size):
        scale_level, min_level = _sub_block_scale_min(row, offset + kind.scales, j, kind.six_bit_scales)
        sub_d = d * F32(scale_level)
        if sub_d == ZERO:
            continue
        sub_min = dmin * F32(min_level)
        for i in range(j * kind.sub_size, (j + 1) * kind.sub_size):
            levels[i] = max(0, min(kind.nmax, nearest_int((block[i] + sub_min) / sub_d)))


@njit(cache=True)
def _pack_levels(levels, kind, out, offset):
    """Low qs_bits of each level into qs, the fifth bit into qh when the type has one.

    A qs byte holds elements l, l+32, l+64, ... of a group of 32·8/qs_bits elements,
    lowest bits first; qh byte l holds the fifth bit of elements l, l+32, ..., l+224.
    """
    per_byte = 8 // kind.qs_bits
    mask = (1 << kind.qs_bits) - 1
    for group in range(QK_K // (_LANES * per_byte)):
        for lane in range(_LANES):
            packed = 0
            for k in range(per_byte):
                level = np.int64(levels[(group * per_byte + k) * _LANES + lane])
                packed |= (level & mask) << (kind.qs_bits * k)
            out[offset + kind.qs + group * _LANES + lane] = packed
    if kind.qh >= 0:
        for lane in range(_LANES):
            high_bits = 0
            for k in range(QK_K // _LANES):
                high_bits |= ((np.int64(levels[k * _LANES + lane]) >> 4) & 1) << k
            out[offset + kind.qh + lane] = high_bits


@njit(cache=True)
def _unpack_sub_block(row, offset, j, kind, levels):
    """Levels of sub-block j of the block at offset into levels; the inverse of _pack_levels.

    A sub-block never straddles two 32-element columns, so one byte offset and
    one shift serve all its elements.
    """
    first = j * kind.sub_size
    column = first // _LANES
    group, k = divmod(column, 8 // kind.qs_bits)
    low_bits = offset + kind.qs + group * _LANES + first % _LANES
    shift = kind.qs_bits * k
    mask = (1 << kind.qs_bits) - 1
    for i in range(kind.sub_size):
        level = (np.int64(row[low_bits + i]) >> shift) & mask
        if kind.qh >= 0:
            level |= ((np.int64(row[offset + kind.qh + first % _LANES + i]) >> column) & 1) << 4
        levels[i] = level


# ---------------------------------------------------------------- rows


@njit(cache=True)
def _quantize_super_block(block, sub_scales, sub_mins, sub_weights, use_imatrix, kind, out, offset, levels, scratch):
    """Quantize one block's fitted sub-block scales and mins, store them, re-quantize and pack the block."""
    scale_levels, min_levels = scratch
    clamp = kind.clamp_imatrix_scales if use_imatrix else kind.clamp_ref_scales
    d = _quantize_sub_values(sub_scales, sub_weights, use_imatrix, kind.scale_nmax, clamp, scale_levels)
    dmin = _quantize_sub_values(sub_mins, sub_weights, use_imatrix, kind.scale_nmax, clamp, min_levels)
    pack_super_block(block, d, dmin, scale_levels, min_levels, kind, out, offset, levels)


@njit(cache=True)
def pack_super_block(block, d, dmin, scale_levels, min_levels, kind, out, offset, levels):
    """Store d, dmin and the sub-block levels, re-quantize against their decoded values, pack the levels.

    levels holds what a sub-block whose decoded scale is zero keeps.
    """
    store_fp16(out, offset + kind.d, d)
    store_fp16(out, offset + kind.d + 2, dmin)
    _pack_scales(scale_levels, min_levels, kind, out, offset + kind.scales)
    _requantize(block, out, offset, kind, levels)
    _pack_levels(levels, kind, out, offset)


@njit(cache=True)
def _quantize_row(x, imatrix, out, kind):
    """Fit every sub-block of the row in one search (they are independent), then finish each super-block."""
    n_sub = QK_K // kind.sub_size
    n_groups = x.size // kind.sub_size
    levels = np.empty(x.size, dtype=np.uint8)
    weights = np.empty(x.size, dtype=np.float32)
    sub_scales = np.empty(n_groups, dtype=np.float32)
    sub_mins = np.empty(n_groups, dtype=np.float32)
    sub_weights = np.empty(n_groups, dtype=np.float32)  # imatrix path
    _fit_sub_blocks(x, imatrix, kind, levels, weights, sub_scales, sub_mins, sub_weights)
    scratch = (np.empty(n_sub, dtype=np.uint8), np.empty(n_sub, dtype=np.uint8))  # scale and min levels
    for b in range(x.size // QK_K):
        block, sub = slice(b * QK_K, (b + 1) * QK_K), slice(b * n_sub, (b + 1) * n_sub)
        _quantize_super_block(x[block], sub_scales[sub], sub_mins[sub], sub_weights[sub], imatrix.size > 0, kind,
                              out, b * kind.block_bytes, levels[block], scratch)  # fmt: skip


@njit(cache=True)
def dequantize_kind_row(q, out, kind):
    """x = d·sc·level − dmin·m, in float32 in ggml's order."""
    levels = np.empty(kind.sub_size, dtype=np.int64)
    for b in range(out.size // QK_K):
        offset = b * kind.block_bytes
        d = load_fp16(q, offset + kind.d)
        dmin = load_fp16(q, offset + kind.d + 2)
        for j in range(QK_K // kind.sub_size):
            scale_level, min_level = _sub_block_scale_min(q, offset + kind.scales, j, kind.six_bit_scales)
            sub_d = d * F32(scale_level)
            sub_min = dmin * F32(min_level)
            _unpack_sub_block(q, offset, j, kind, levels)
            first = b * QK_K + j * kind.sub_size
            for i in range(kind.sub_size):
                out[first + i] = sub_d * F32(levels[i]) - sub_min


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q2_k(x, imatrix, out):
    _quantize_row(x, imatrix, out, KIND_Q2_K)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q4_k(x, imatrix, out):
    _quantize_row(x, imatrix, out, KIND_Q4_K)


@njit(QUANTIZE_ROW, cache=True)
def quantize_row_q5_k(x, imatrix, out):
    _quantize_row(x, imatrix, out, KIND_Q5_K)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q2_k(q, out):
    dequantize_kind_row(q, out, KIND_Q2_K)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q4_k(q, out):
    dequantize_kind_row(q, out, KIND_Q4_K)


@njit(DEQUANTIZE_ROW, cache=True)
def dequantize_row_q5_k(q, out):
    dequantize_kind_row(q, out, KIND_Q5_K)


KERNELS = {
    GGMLQuantizationType.Q2_K: (quantize_row_q2_k, dequantize_row_q2_k),
    GGMLQuantizationType.Q4_K: (quantize_row_q4_k, dequantize_row_q4_k),
    GGMLQuantizationType.Q5_K: (quantize_row_q5_k, dequantize_row_q5_k),
}
