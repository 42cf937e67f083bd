"""The search tables of the 2-bit and 1-bit i-quants: ggml's `iq2xs_init_impl`, for all four grid sizes.

IQ2_XXS (256 points), IQ2_XS (512), IQ2_S (1024) and IQ1_S/IQ1_M (2048) store each group of 8 weights as
the index of one point of a fixed lattice grid (ggml-common.h's iq2xxs_grid, iq2xs_grid, iq2s_grid,
iq1s_grid). Their quantizers round a group to 8 levels l in 0..3 and then need two things: the grid index
of that point, if it lies on the grid, and otherwise a short list of the grid points nearest to it, among
which the weighted error picks. `iq2_tables` builds both exactly as ggml does (same values, same order),
from the ggml-common.h grids: every byte of a grid entry is one of three levels, which map to l = 0, 1, 2
in increasing order. Building takes 0.05 s (256 points) to 0.4 s (2048); the result is cached in bpwopt's
cache folder, keyed by a hash of the source grid, so that importing the kernels that freeze these tables
stays cheap (a few ms), and built in memory where that folder cannot be written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import zipfile

import numpy as np
from numba import njit

from bpwopt.formats.files import cache_dir
from bpwopt.quant.tables import grid_table

MAP_SIZE = 43692  # ggml's kmap_size: one past the largest 2-bit index of a grid point (every l ≤ 2)
GROUP = 8  # weights per grid point
_LEVELS_PER_COORDINATE = 4  # the map is indexed by 2 bits per coordinate
_SOURCE_GRIDS = {256: "iq2xxs_grid", 512: "iq2xs_grid", 1024: "iq2s_grid", 2048: "iq1s_grid"}
# How many distinct distances ggml keeps in each off-grid point's neighbour list.
_DISTANCE_LEVELS = {256: 2, 512: 2, 1024: 1, 2048: 3}
_CACHE_VERSION = "1"  # bump when the build changes what it writes


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

    neighbours = _neighbour_lists(kmap, positions.astype(np.int64), _DISTANCE_LEVELS[grid_size])
    return grid, kmap, neighbours


@njit(cache=True)
def _neighbour_lists(kmap, grid_positions, distance_levels):
    """ggml's neighbour lists, in map order: for each off-grid point, its count and then the grid
    indices at its `distance_levels` smallest distinct squared distances, by distance and then by
    index (ggml sorts all (d², j) pairs and cuts; one histogram of the few possible d² values
    gives the same lists in O(grid_size)). Sets each off-grid kmap entry to −(offset + 1).
    """
    grid_size = grid_positions.shape[0]
    max_distance = GROUP * (2 * (_LEVELS_PER_COORDINATE - 1)) ** 2
    distances = np.empty(grid_size, dtype=np.int64)
    present = np.empty(max_distance + 1, dtype=np.bool_)
    point = np.empty(GROUP, dtype=np.int64)
    neighbours = np.empty(1 << 16, dtype=np.uint16)
    used = 0
    for index in range(kmap.size):
        if kmap[index] >= 0:
            continue
        for k in range(GROUP):
            point[k] = 2 * ((index >> (2 * k)) & (_LEVELS_PER_COORDINATE - 1)) + 1
        present[:] = False
        for j in range(grid_size):
            distance = 0
            for k in range(GROUP):
                diff = grid_positions[j, k] - point[k]
                distance += diff * diff
            distances[j] = distance
            present[distance] = True
        if neighbours.size < used + 1 + grid_size:
            grown = np.empty(2 * neighbours.size + grid_size, dtype=np.uint16)
            grown[:used] = neighbours[:used]
            neighbours = grown
        kmap[index] = -(used + 1)
        start = used
        used += 1
        levels_kept = 0
        for level in range(max_distance + 1):
            if not present[level]:
                continue
            for j in range(grid_size):
                if distances[j] == level:
                    neighbours[used] = j
                    used += 1
            levels_kept += 1
            if levels_kept == distance_levels:
                break
        neighbours[start] = used - start - 1
    return neighbours[:used].copy()
