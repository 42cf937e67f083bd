"""IQ2_XXS and IQ2_XS against ggml, and the grid tables their searches use.

The tables are checked against ggml-common.h's grids (decoding our grid gives them back) and against
a brute-force reading of iq2xs_init_impl: sort every grid point by (d², index), keep the nearest
few distance levels.
"""

from __future__ import annotations

import numpy as np
import pytest

from bpwopt.quant.kernels import iq2_grids
from bpwopt.quant.kernels.iq2_grids import MAP_SIZE, iq2_tables
from bpwopt.quant.tables import grid_table

# Per grid size: the ggml-common.h table, the byte values of its three levels, and how many distinct
# distances ggml keeps in a neighbour list (its `nwant`).
GRIDS = {
    256: ("iq2xxs_grid", (0x08, 0x19, 0x2B), 2),
    512: ("iq2xs_grid", (0x08, 0x19, 0x2B), 2),
    1024: ("iq2s_grid", (0x08, 0x19, 0x2B), 1),
    2048: ("iq1s_grid", (-1, 0, 1), 3),
}


def map_index(positions: np.ndarray) -> np.ndarray:
    """The 2-bit map index of points given as 8 positions 2l+1 (int array (..., 8))."""
    levels = (positions.astype(np.int64) - 1) // 2
    return np.sum(levels << (2 * np.arange(8)), axis=-1)


def neighbour_lists(kmap: np.ndarray, neighbours: np.ndarray) -> dict[int, np.ndarray]:
    """Every off-grid map index → its list, read through kmap as ggml's quantizers read it."""
    lists = {}
    for index in np.flatnonzero(kmap < 0):
        offset = -int(kmap[index]) - 1
        count = int(neighbours[offset])
        lists[int(index)] = neighbours[offset + 1 : offset + 1 + count]
    return lists


@pytest.mark.parametrize("grid_size", sorted(GRIDS))
def test_grid_decodes_to_ggml_common(grid_size):
    name, level_values, _ = GRIDS[grid_size]
    grid, _, _ = iq2_tables(grid_size)
    assert grid.dtype == np.uint64 and grid.shape == (grid_size,)
    positions = grid.view(np.int8).reshape(grid_size, 8)
    assert set(np.unique(positions)) <= {1, 3, 5}
    decoded = np.array(level_values, dtype=np.int64)[(positions - 1) // 2]
    expected = grid_table(name).view(np.int8 if min(level_values) < 0 else np.uint8).reshape(grid_size, 8)
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("grid_size", sorted(GRIDS))
def test_map_and_neighbour_lists(grid_size):
    _, _, distance_levels = GRIDS[grid_size]
    grid, kmap, neighbours = iq2_tables(grid_size)
    positions = grid.view(np.int8).reshape(grid_size, 8).astype(np.int64)
    assert kmap.dtype == np.int32 and kmap.shape == (MAP_SIZE,) and neighbours.dtype == np.uint16

    # Every grid point maps to itself, and nothing else is on the grid.
    np.testing.assert_array_equal(kmap[map_index(positions)], np.arange(grid_size))
    assert np.count_nonzero(kmap >= 0) == grid_size

    # The lists of the off-grid points follow one another in map order and fill the array exactly.
    lists = neighbour_lists(kmap, neighbours)
    assert len(lists) == MAP_SIZE - grid_size
    offsets = -kmap[kmap < 0].astype(np.int64) - 1
    sizes = np.array([entries.size for entries in lists.values()])
    np.testing.assert_array_equal(offsets, np.concatenate(([0], np.cumsum(sizes + 1)[:-1])))
    assert offsets[-1] + 1 + sizes[-1] == neighbours.size and sizes.min() > 0

    # Brute force on a sample: sort the whole grid by (d², index), keep the first distance levels.
    rng = np.random.default_rng(grid_size)
    for index in rng.choice(np.array(sorted(lists)), size=300, replace=False):
        point = 2 * ((index >> (2 * np.arange(8))) & 3) + 1
        distances = np.sum((positions - point) ** 2, axis=1)
        order = np.lexsort((np.arange(grid_size), distances))
        kept_levels = np.unique(distances)[:distance_levels]
        expected = order[np.isin(distances[order], kept_levels)]
        np.testing.assert_array_equal(lists[int(index)], expected, err_msg=f"point {index}")


def test_tables_cached_on_disk_and_rebuilt_when_unusable(tmp_path, monkeypatch):
    monkeypatch.setenv("BPWOPT_CACHE", str(tmp_path))
    iq2_grids._cached_tables.cache_clear()
    try:
        built = iq2_tables(256)
        (cached,) = tmp_path.glob("iq2_tables_256_*.npz")
        iq2_grids._cached_tables.cache_clear()
        loaded = iq2_tables(256)
        for ours, theirs in zip(built, loaded, strict=True):
            np.testing.assert_array_equal(ours, theirs)

        cached.write_bytes(b"not a numpy archive")
        iq2_grids._cached_tables.cache_clear()
        np.testing.assert_array_equal(iq2_tables(256)[2], built[2])

        # A cache folder that cannot exist (under a regular file): built in memory, nothing written.
        monkeypatch.setenv("BPWOPT_CACHE", str(cached / "below_a_file"))
        iq2_grids._cached_tables.cache_clear()
        np.testing.assert_array_equal(iq2_tables(256)[1], built[1])
        assert sorted(path.name for path in tmp_path.iterdir()) == [cached.name]
    finally:
        iq2_grids._cached_tables.cache_clear()


def test_unknown_grid_size_refused():
    with pytest.raises(KeyError):
        iq2_tables(128)
