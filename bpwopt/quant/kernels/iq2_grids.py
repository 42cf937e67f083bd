"""The search tables of the 2-bit and 1-bit i-quants: ggml's `iq2xs_init_impl`, for all four grid sizes.

IQ2_XXS (256 points), IQ2_XS (512), IQ2_S (1024) and IQ1_S/IQ1_M (2048) store each group of 8 weights as
the index of one point of a fixed lattice grid (ggml-common.h's iq2xxs_grid, iq2xs_grid, iq2s_grid,
iq1s_grid). Their quantizers round a group to 8 levels l in 0..3 and then need two things: the grid index
of that point, if it lies on the grid, and otherwise a short list of the grid points nearest to it, among
which the weighted error picks. `iq2_tables` builds both exactly as ggml does (same values, same order),
from the ggml-common.h grids: every byte of a grid entry is one of three levels, which map to l = 0, 1, 2
in increasing order. Building takes a fraction of a second; the result is cached in bpwopt's cache folder,
keyed by a hash of the source grid, so that importing the kernels that freeze these tables stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import zipfile

import numpy as np

from bpwopt.formats.files import cache_dir
from bpwopt.quant.tables import grid_table

MAP_SIZE = 43692  # ggml's kmap_size: one past the largest 2-bit index of a grid point (every l ≤ 2)
GROUP = 8  # weights per grid point
_LEVELS_PER_COORDINATE = 4  # the map is indexed by 2 bits per coordinate
_SOURCE_GRIDS = {256: "iq2xxs_grid", 512: "iq2xs_grid", 1024: "iq2s_grid", 2048: "iq1s_grid"}
# How many distinct distances ggml keeps in each off-grid point's neighbour list.
_DISTANCE_LEVELS = {256: 2, 512: 2, 1024: 1, 2048: 3}
_CACHE_VERSION = "1"  # bump when the build changes what it writes
_BATCH = 4096  # off-grid points whose distances are computed at once (4096 × 2048 float32 = 32 MiB)


def grid_levels(grid_size: int) -> np.ndarray:
    """The ggml-common.h grid as levels: uint8 (grid_size, 8), each 0, 1 or 2 (its byte's rank)."""
    source = grid_table(_SOURCE_GRIDS[grid_size])
    signed_bytes = source.view(np.int8).reshape(grid_size, GROUP)
    values = np.unique(signed_bytes)
    return np.searchsorted(values, signed_bytes).astype(np.uint8)


def kgrid(grid_size: int) -> np.ndarray:
    """ggml's kgrid_2bit_256 / _512 / _1024 / kgrid_1bit_2048: uint16 per point, 2 bits per coordinate."""
    levels = grid_levels(grid_size).astype(np.uint16)
    shifts = np.arange(GROUP, dtype=np.uint16) * 2
    return np.bitwise_or.reduce(levels << shifts, axis=1).astype(np.uint16)


def iq2_tables(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, kmap, neighbours) exactly as ggml's iq2_data entry after iq2xs_init_impl:
    grid uint64[grid_size] (kgrid_q2xs: 8 int8 positions 2l+1 per entry),
    kmap int32[kmap_size] (>= 0: the grid index of that point; < 0: -(offset+1) into neighbours),
    neighbours uint16 (per off-grid point: the count, then the neighbour indices).

    The arrays are read-only and shared between callers. Raises KeyError for a size that no type uses.
    """
    if grid_size not in _SOURCE_GRIDS:
        raise KeyError(f"no i-quant grid has {grid_size} points (sizes: {sorted(_SOURCE_GRIDS)})")
    return _cached_tables(grid_size)


@functools.cache
def _cached_tables(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    source = grid_table(_SOURCE_GRIDS[grid_size])
    key = hashlib.sha256(f"{_CACHE_VERSION}:{grid_size}:".encode() + source.tobytes()).hexdigest()[:16]
    path = cache_dir() / f"iq2_tables_{grid_size}_{key}.npz"
    tables = _load(path, grid_size)
    if tables is None:
        tables = _build(grid_size)
        _store(path, tables)
    for table in tables:
        table.flags.writeable = False
    return tables


def _load(path, grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The cached tables, or None where the file is missing, unreadable or not what we write (then they
    are rebuilt)."""
    try:
        with np.load(path) as archive:
            grid, kmap, neighbours = archive["grid"], archive["kmap"], archive["neighbours"]
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    well_formed = (
        grid.dtype == np.uint64
        and grid.shape == (grid_size,)
        and kmap.dtype == np.int32
        and kmap.shape == (MAP_SIZE,)
        and neighbours.dtype == np.uint16
        and neighbours.ndim == 1
    )
    return (grid, kmap, neighbours) if well_formed else None


def _store(path, tables: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Write the cache atomically (a temporary, then os.replace); a folder we cannot write is no error."""
    grid, kmap, neighbours = tables
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, grid=grid, kmap=kmap, neighbours=neighbours)
        os.replace(temporary, path)
        temporary = None
    except OSError:
        pass
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _build(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    levels = grid_levels(grid_size)
    positions = (2 * levels.astype(np.int8) + 1).astype(np.int8)  # 1, 3 or 5
    grid = np.ascontiguousarray(positions).view(np.uint64).reshape(grid_size)

    kmap = np.full(MAP_SIZE, -1, dtype=np.int32)
    kmap[kgrid(grid_size)] = np.arange(grid_size, dtype=np.int32)

    off_grid = np.flatnonzero(kmap < 0)
    shifts = 2 * np.arange(GROUP)
    counts = np.empty(off_grid.size, dtype=np.int64)
    indices = []
    for start in range(0, off_grid.size, _BATCH):
        points = off_grid[start : start + _BATCH]
        point_positions = 2 * ((points[:, None] >> shifts) & (_LEVELS_PER_COORDINATE - 1)) + 1
        batch_counts, batch_indices = _nearest(point_positions, positions, _DISTANCE_LEVELS[grid_size])
        counts[start : start + points.size] = batch_counts
        indices.append(batch_indices)

    # Each off-grid point's list is its count followed by its indices, the lists in map order.
    offsets = np.concatenate(([0], np.cumsum(counts + 1)[:-1]))
    kmap[off_grid] = -(offsets + 1).astype(np.int32)
    neighbours = np.empty(int(np.sum(counts + 1)), dtype=np.uint16)
    neighbours[offsets] = counts
    is_index = np.ones(neighbours.size, dtype=bool)
    is_index[offsets] = False
    neighbours[is_index] = np.concatenate(indices)
    return grid, kmap, neighbours


def _nearest(point_positions: np.ndarray, grid_positions: np.ndarray, distance_levels: int):
    """For each point, the grid indices at its `distance_levels` smallest distinct squared distances,
    by distance and then by index: ggml's sort of (d², j) pairs cut after that many distance levels.

    Returns (counts int64[npoints], indices uint16: every point's list, one after the other). The
    squared distances come from one integer-valued matrix product (exact in float32: every value
    stays far below 2**24); sorting only the kept entries by (point, d², j) gives ggml's order.
    """
    points = point_positions.astype(np.float32)
    grid = grid_positions.astype(np.float32)
    distances = (
        np.sum(points * points, axis=1)[:, None] + np.sum(grid * grid, axis=1)[None, :] - 2 * (points @ grid.T)
    ).astype(np.int16)  # at most 8 · 6² = 288
    cutoff = distances.min(axis=1)
    no_distance = np.iinfo(np.int16).max
    for _ in range(distance_levels - 1):
        # the next distinct distance above the current cutoff (a point with none keeps its cutoff)
        next_level = np.where(distances > cutoff[:, None], distances, no_distance).min(axis=1)
        cutoff = np.where(next_level == no_distance, cutoff, next_level)
    rows, columns = np.nonzero(distances <= cutoff[:, None])  # row-major: by point, then by index
    order = np.lexsort((columns, distances[rows, columns], rows))
    counts = np.bincount(rows, minlength=points.shape[0])
    return counts, columns[order].astype(np.uint16)
