"""Row-parallel drivers shared by every quantization type.

Each type supplies two row kernels with fixed Numba signatures:

* `quantize_row(x: float32[n], imatrix: float32[n] or float32[0], out: uint8[row_bytes])`
* `dequantize_row(q: uint8[row_bytes], out: float32[n])`

The drivers below take those kernels as first-class function values (not as
dispatcher objects), which keeps one compiled, disk-cached driver for all
types instead of one per type. An empty imatrix stands for "none", exactly
like ggml's NULL `quant_weights`.
"""

import numpy as np
from numba import njit, prange, types

QUANTIZE_ROW = types.void(types.float32[::1], types.float32[::1], types.uint8[::1])
DEQUANTIZE_ROW = types.void(types.uint8[::1], types.float32[::1])
_QuantizeRowFn = types.FunctionType(QUANTIZE_ROW)
_DequantizeRowFn = types.FunctionType(DEQUANTIZE_ROW)


@njit(
    types.void(_QuantizeRowFn, types.float32[:, ::1], types.float32[::1], types.uint8[:, ::1]),
    parallel=True,
    cache=True,
)
def quantize_rows(quantize_row, x, imatrix, out):
    """Quantize every row of x (nrows, n_per_row) into out (nrows, row_bytes)."""
    for row in prange(x.shape[0]):
        quantize_row(x[row], imatrix, out[row])


@njit(
    types.void(_DequantizeRowFn, types.uint8[:, ::1], types.float32[:, ::1]),
    parallel=True,
    cache=True,
)
def dequantize_rows(dequantize_row, q, out):
    """Dequantize every row of q (nrows, row_bytes) into out (nrows, n_per_row)."""
    for row in prange(q.shape[0]):
        dequantize_row(q[row], out[row])


@njit(
    types.UniTuple(types.float64[::1], 2)(
        _QuantizeRowFn, _DequantizeRowFn, types.float32[:, ::1], types.float32[::1], types.int64
    ),
    parallel=True,
    cache=True,
)
def row_errors(quantize_row, dequantize_row, x, imatrix, row_bytes):
    """Per-row squared error that a round trip through the type adds.

    Returns (weighted_sse, sse), float64 arrays of length nrows:
    Σ_j imatrix_j (x_j − x̂_j)² and Σ_j (x_j − x̂_j)². With an empty imatrix the
    two are equal. The quantized bytes never leave the kernel.
    """
    nrows, n_per_row = x.shape
    weighted_sse = np.zeros(nrows, dtype=np.float64)
    sse = np.zeros(nrows, dtype=np.float64)
    weighted = imatrix.size > 0
    for row in prange(nrows):
        packed = np.empty(row_bytes, dtype=np.uint8)
        restored = np.empty(n_per_row, dtype=np.float32)
        quantize_row(x[row], imatrix, packed)
        dequantize_row(packed, restored)
        row_weighted = 0.0
        row_plain = 0.0
        for j in range(n_per_row):
            diff = np.float64(x[row, j]) - np.float64(restored[j])
            squared = diff * diff
            row_plain += squared
            row_weighted += np.float64(imatrix[j]) * squared if weighted else squared
        weighted_sse[row] = row_weighted
        sse[row] = row_plain
    return weighted_sse, sse


@njit(
    types.UniTuple(types.float64[::1], 2)(
        _DequantizeRowFn, types.uint8[:, ::1], types.float32[:, ::1], types.int64[::1], types.int64
    ),
    parallel=True,
    cache=True,
)
def row_energies(dequantize_row, q, weights, expert_of_row, n_per_row):
    """Per-row signal energy of the decoded rows of q (nrows, row_bytes), in one pass and no float copy of q.

    Returns (weighted, plain), float64 arrays of length nrows: Σ_j w_j x_j² with
    w the row's expert's row of weights (n_expert, n_per_row), and Σ_j x_j². With
    weights of shape (0, 0) the two are equal. A row holding a NaN or an infinity
    has a non-finite plain energy (finite float32 squares cannot overflow float64).
    """
    nrows = q.shape[0]
    weighted = np.zeros(nrows, dtype=np.float64)
    plain = np.zeros(nrows, dtype=np.float64)
    has_weights = weights.shape[0] > 0
    for row in prange(nrows):
        values = np.empty(n_per_row, dtype=np.float32)
        dequantize_row(q[row], values)
        row_plain = 0.0
        row_weighted = 0.0
        if has_weights:
            w = weights[expert_of_row[row]]
            for j in range(n_per_row):
                squared = np.float64(values[j]) * np.float64(values[j])
                row_plain += squared
                row_weighted += np.float64(w[j]) * squared
        else:
            for j in range(n_per_row):
                row_plain += np.float64(values[j]) * np.float64(values[j])
            row_weighted = row_plain
        weighted[row] = row_weighted
        plain[row] = row_plain
    return weighted, plain
