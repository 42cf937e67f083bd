"""IQ2_XXS and IQ2_XS against ggml, and the grid tables their searches use.

The tables are checked against ggml-common.h's grids (decoding our grid gives them back) and against
a brute-force reading of iq2xs_init_impl: sort every grid point by (d², index), keep the nearest
few distance levels. The kernels' bytes are compared with ggml_quantize_chunk, their decoders with
gguf-py's and ggml's. ggml requires an imatrix for both types (it aborts the process without one),
so every comparison passes one.
"""

from __future__ import annotations

import zlib

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from bpwopt.quant.kernels import iq2_grids
from bpwopt.quant.kernels.iq2 import KERNELS
from bpwopt.quant.kernels.iq2_grids import MAP_SIZE, iq2_tables
from bpwopt.quant.kernels.rows import dequantize_rows, quantize_rows
from bpwopt.quant.reference import ggml_dequantize, ggml_quantize
from bpwopt.quant.tables import grid_table
from tests.conftest import ROW_KINDS, make_imatrix, make_rows

TYPES = ("IQ2_XXS", "IQ2_XS")

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


def quantize(x: np.ndarray, name: str, imatrix: np.ndarray) -> np.ndarray:
    quantize_row, _ = KERNELS[GGMLQuantizationType[name]]
    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    out = np.zeros((x.shape[0], x.shape[1] // block_size * block_bytes), dtype=np.uint8)
    quantize_rows(quantize_row, x, imatrix, out)
    return out


def dequantize(q: np.ndarray, name: str, n_per_row: int) -> np.ndarray:
    _, dequantize_row = KERNELS[GGMLQuantizationType[name]]
    out = np.zeros((q.shape[0], n_per_row), dtype=np.float32)
    dequantize_rows(dequantize_row, q, out)
    return out


def assert_same_as_ggml(x: np.ndarray, name: str, imatrix: np.ndarray) -> np.ndarray:
    ours = quantize(x, name, imatrix)
    theirs = ggml_quantize(x, name, imatrix)
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]
    differing = (ours != theirs).reshape(x.shape[0], -1, block_bytes).any(axis=2)
    assert not differing.any(), f"{name}: {differing.sum()} of {differing.size} blocks differ from ggml"
    return ours


def assert_decodes_like_ggml(q: np.ndarray, name: str, n_per_row: int) -> None:
    ours = dequantize(q, name, n_per_row)
    np.testing.assert_array_equal(ours, ggml_dequantize(q, name))
    gguf_values = gguf.quants.dequantize(q, GGMLQuantizationType[name]).reshape(ours.shape)
    np.testing.assert_array_equal(ours, gguf_values)


# ggml aborts the process (GGML_ASSERT in iq2_find_best_neighbour) for IQ2_XS on the huge rows
# (|x| ~ 1e30): see ABORTING_MAGNITUDES below.
GGML_ABORTS = {("IQ2_XS", "huge")}


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ROW_KINDS)
@pytest.mark.parametrize("n_per_row", [256, 512, 1536])
def test_bytes_equal_ggml(name, kind, n_per_row):
    if (name, kind) in GGML_ABORTS:
        return
    seed = zlib.crc32(f"{name}{kind}{n_per_row}".encode()) % 1000
    x = make_rows(kind, 4, n_per_row, seed=seed)
    q = assert_same_as_ggml(x, name, make_imatrix(n_per_row, seed=seed + 1))
    assert_decodes_like_ggml(q, name, n_per_row)


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_ggml_with_a_positive_imatrix(name):
    rng = np.random.default_rng(7)
    x = np.concatenate([make_rows(kind, 2, 512, seed=3) for kind in ROW_KINDS if (name, kind) not in GGML_ABORTS])
    assert_same_as_ggml(x, name, (rng.random(512) + 0.01).astype(np.float32))


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_ggml_up_to_the_largest_magnitudes_ggml_survives(name):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((8, 256)) * 10.0 ** rng.integers(-37, 15, size=(8, 1))).astype(np.float32)
    assert_same_as_ggml(x, name, make_imatrix(256))


# Magnitudes at which the weighted errors overflow to inf and ggml aborts the process (GGML_ASSERT in
# iq2_find_best_neighbour: no neighbour closer than FLT_MAX), checked in a subprocess for these rows.
# From 1e19 on, IQ2_XXS's x² overflows too, its scales become NaN and ggml writes zeros instead.
ABORTING_MAGNITUDES = {"IQ2_XXS": (1e16, 1e17, 1e18), "IQ2_XS": (1e16, 1e18, 1e20, 1e30)}


def overflowing_rows(magnitudes) -> np.ndarray:
    rng = np.random.default_rng(9)
    return (rng.standard_normal((len(magnitudes), 256)) * np.array(magnitudes)[:, None]).astype(np.float32)


def test_iq2_xxs_past_overflow_equals_ggml():
    assert_same_as_ggml(overflowing_rows((1e19, 1e20, 1e25, 1e30)), "IQ2_XXS", make_imatrix(256))


@pytest.mark.parametrize("name", TYPES)
def test_where_ggml_aborts_every_block_gets_an_infinite_scale(name):
    # These kernels take the lattice-nearest neighbour where ggml aborts; no fp16 super-block scale
    # reaches such magnitudes anyway, and ggml's decoder reads the blocks as ours does.
    q = quantize(overflowing_rows(ABORTING_MAGNITUDES[name]), name, make_imatrix(256))
    assert np.isinf(q[:, :2].copy().view(np.float16)).all()
    assert_decodes_like_ggml(q, name, 256)


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_ggml_on_smollm2_ffn_down(demo_model_path, name):
    reader = gguf.GGUFReader(demo_model_path)
    tensor = next(t for t in reader.tensors if t.name == "blk.5.ffn_down.weight")
    x = gguf.quants.dequantize(tensor.data, tensor.tensor_type)[:64].copy()
    assert x.shape == (64, 1536)
    imatrix = (np.random.default_rng(3).random(1536) * 4 + 0.01).astype(np.float32)
    q = assert_same_as_ggml(x, name, imatrix)
    assert_decodes_like_ggml(q, name, 1536)


@pytest.mark.parametrize("name", TYPES)
def test_no_imatrix_is_refused(name):
    quantize_row, _ = KERNELS[GGMLQuantizationType[name]]
    out = np.zeros(GGML_QUANT_SIZES[GGMLQuantizationType[name]][1], dtype=np.uint8)
    with pytest.raises(ValueError, match="importance matrix"):
        quantize_row(np.ones(256, dtype=np.float32), np.zeros(0, dtype=np.float32), out)
