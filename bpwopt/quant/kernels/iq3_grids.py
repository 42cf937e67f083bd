"""The lookup tables of ggml's 3-bit i-quants (IQ3_XXS, IQ3_S), built as `iq3xs_init_impl` builds them.

Both types code groups of 4 magnitudes as one point of a grid in {0..7}⁴: 256
points for IQ3_XXS, 512 for IQ3_S. The quantizer rounds each magnitude to a
level l, packs the four levels into a 12-bit index (l₀ | l₁<<3 | l₂<<6 | l₃<<9)
and looks it up in `kmap`: the grid index of a point on the grid, or where the
list of its nearest grid points starts in `neighbours` when it is not. The
points come from ggml-common.h's `iq3xxs_grid` / `iq3s_grid` (decoded here by
mapping each byte's value to its level), so no second copy of the grids lives
in bpwopt. The tables are built with numpy in a few milliseconds, once per
process, when `bpwopt.quant.kernels.iq3` is imported (its Numba kernels freeze
them as constants).
"""

from __future__ import annotations

import functools

import numpy as np

from bpwopt.quant.tables import grid_table

GRID_NAMES = {256: "iq3xxs_grid", 512: "iq3s_grid"}
N_POINTS = 8**4  # every point of {0..7}⁴, by its 12-bit index
GROUP = 4  # magnitudes per grid point
# How many of the nearest distinct distances an off-grid point keeps neighbours at.
_N_DISTANCES = {256: 2, 512: 3}


def grid_levels(grid_size: int) -> np.ndarray:
    """int8 (grid_size, 4): the level 0..7 of each of a grid point's four positions.

    ggml-common.h stores each position as one byte of a uint32 (little end
    first); the eight byte values of a grid are its eight levels in order.
    """
    packed = grid_table(GRID_NAMES[grid_size])
    grid_bytes = packed.astype("<u4").view(np.uint8).reshape(grid_size, GROUP)
    values = np.unique(grid_bytes)
    if values.size != 8:
        raise ValueError(f"{GRID_NAMES[grid_size]} has {values.size} byte values, expected 8")
    return np.searchsorted(values, grid_bytes).astype(np.int8)


def point_index(levels: np.ndarray) -> np.ndarray:
    """The 12-bit index l₀ | l₁<<3 | l₂<<6 | l₃<<9 of each row of levels (…, 4)."""
    shifts = 3 * np.arange(GROUP)
    return (levels.astype(np.int64) << shifts).sum(axis=-1)


def _pair_distances(centres: np.ndarray) -> np.ndarray:
    """uint8 (n, 64): (a₀−c₀)² + (a₁−c₁)² from each centre c (n, 2) to each pair of levels a = a₀ | a₁<<3."""
    levels = np.arange(8)
    square = (centres.astype(np.int64)[:, None, :] - levels[None, :, None]) ** 2  # (n, 8, 2)
    return (square[:, :, None, 1] + square[:, None, :, 0]).reshape(-1, 64).astype(np.uint8)


@functools.cache
def iq3_tables(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, kmap, neighbours) exactly as ggml's iq3_data entry after iq3xs_init_impl(grid_size).

    grid: uint32[grid_size], the four positions 2l+1 of each point as bytes
    (little end first). kmap: int32[4096], the grid index of each point on the
    grid, −(offset+1) for the others. neighbours: uint16, for each off-grid
    point in index order its count n then n grid indices: every grid point at
    one of the 2 (IQ3_XXS) or 3 (IQ3_S) smallest squared distances from it,
    ordered by (distance, index) as ggml's qsort leaves them. Read-only.
    """
    levels = grid_levels(grid_size)
    positions = (2 * levels + 1).astype(np.uint8)
    grid = np.ascontiguousarray(positions).view("<u4").reshape(grid_size).astype(np.uint32)

    kmap = np.full(N_POINTS, -1, dtype=np.int32)
    kmap[point_index(levels)] = np.arange(grid_size, dtype=np.int32)
    off_grid = np.flatnonzero(kmap < 0)

    # Squared level distances (a quarter of ggml's, which measures positions 2l+1: the same order) from
    # every grid point (rows) to every off-grid point (columns), as uint8 sums of two tables over pairs
    # of coordinates; reductions then run down the columns, which numpy vectorizes.
    dist2 = _pair_distances(levels[:, :2])[:, off_grid & 63] + _pair_distances(levels[:, 2:])[:, off_grid >> 6]
    # The largest distance kept: the n-th smallest distinct one of each column.
    thresholds = [dist2.min(axis=0)]
    for _ in range(_N_DISTANCES[grid_size] - 1):
        thresholds.append(np.where(dist2 > thresholds[-1], dist2, np.uint8(255)).min(axis=0))
    cols, rows = np.nonzero(dist2 <= thresholds[-1])
    distance_rank = sum((dist2[cols, rows] > t[rows]).astype(np.int64) for t in thresholds[:-1])
    order = np.lexsort((cols, distance_rank, rows))
    rows, cols = rows[order], cols[order]

    counts = np.bincount(rows, minlength=off_grid.size)
    offsets = np.concatenate(([0], np.cumsum(1 + counts)[:-1]))
    neighbours = np.empty(off_grid.size + rows.size, dtype=np.uint16)
    neighbours[offsets] = counts
    first_of_row = np.concatenate(([0], np.cumsum(counts)[:-1]))
    neighbours[offsets[rows] + 1 + np.arange(rows.size) - first_of_row[rows]] = cols
    kmap[off_grid] = -(offsets + 1)

    for table in (grid, kmap, neighbours):
        table.flags.writeable = False
    return grid, kmap, neighbours
