"""IQ3_XXS and IQ3_S against ggml, and the grid tables their searches use.

The tables are checked against ggml-common.h's grids and gguf-py's independent copy (decoding our grid
gives them back), against a brute-force reading of iq3xs_init_impl (sort the grid by (d², index), keep
the nearest two or three distance levels) and against the sizes ggml allocates. The row kernels are
compared byte for byte with ggml_quantize_chunk, the decoders with gguf-py's.
"""

from __future__ import annotations

from functools import partial

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from bpwopt.quant.kernels import iq3
from bpwopt.quant.kernels.iq3_grids import N_POINTS, iq3_tables
from bpwopt.quant.kernels.numerics import fp16_bits_to_fp32
from bpwopt.quant.tables import grid_table
from tests.conftest import (
    ROW_KINDS,
    assert_kernel_same_as_ggml,
    block_bytes,
    kernel_dequantize,
    kernel_quantize,
    make_imatrix,
    make_rows,
)

# Per grid size: the ggml-common.h table, gguf-py's class for the type, and how many distinct distances
# ggml keeps in a neighbour list (its `nwant`).
GRIDS = {
    256: ("iq3xxs_grid", gguf.quants.IQ3_XXS, 2),
    512: ("iq3s_grid", gguf.quants.IQ3_S, 3),
}
# num_neighbors + num_not_in_map, the length of the neighbour array iq3xs_init_impl allocates
# (printed by ggml's own code built from ggml-quants.c, llama-cpp-python 0.3.36).
GGML_NEIGHBOURS_SIZE = {256: 22825, 512: 28317}

TYPES = ("IQ3_XXS", "IQ3_S")


quantize = partial(kernel_quantize, iq3.KERNELS)
dequantize = partial(kernel_dequantize, iq3.KERNELS)
assert_same_as_ggml = partial(assert_kernel_same_as_ggml, iq3.KERNELS)


# ---------------------------------------------------------------- tables


def map_index(levels: np.ndarray) -> np.ndarray:
    return np.sum(levels.astype(np.int64) << (3 * np.arange(4)), axis=-1)


@pytest.mark.parametrize("grid_size", sorted(GRIDS))
def test_grid_decodes_to_ggml_common_and_gguf(grid_size):
    name, gguf_type, _ = GRIDS[grid_size]
    grid, _, _ = iq3_tables(grid_size)
    assert grid.dtype == np.uint32 and grid.shape == (grid_size,)
    positions = grid.view(np.uint8).reshape(grid_size, 4)
    assert set(np.unique(positions)) == {1, 3, 5, 7, 9, 11, 13, 15}
    levels = (positions - 1) // 2
    gguf_type.init_grid()
    decoded = np.array(gguf_type.grid_map, dtype=np.int64)[levels]
    np.testing.assert_array_equal(decoded, gguf_type.grid.reshape(grid_size, 4))
    np.testing.assert_array_equal(decoded, grid_table(name).view(np.uint8).reshape(grid_size, 4))


@pytest.mark.parametrize("grid_size", sorted(GRIDS))
def test_map_and_neighbour_lists(grid_size):
    _, _, distance_levels = GRIDS[grid_size]
    grid, kmap, neighbours = iq3_tables(grid_size)
    positions = grid.view(np.uint8).reshape(grid_size, 4).astype(np.int64)
    assert kmap.dtype == np.int32 and kmap.shape == (N_POINTS,) and neighbours.dtype == np.uint16
    assert neighbours.size == GGML_NEIGHBOURS_SIZE[grid_size]

    # Every grid point maps to itself, and nothing else is on the grid.
    np.testing.assert_array_equal(kmap[map_index((positions - 1) // 2)], np.arange(grid_size))
    assert np.count_nonzero(kmap >= 0) == grid_size

    # The lists of the off-grid points follow one another in map order and fill the array exactly.
    off_grid = np.flatnonzero(kmap < 0)
    offsets = -kmap[off_grid].astype(np.int64) - 1
    sizes = neighbours[offsets].astype(np.int64)
    assert sizes.min() > 0
    np.testing.assert_array_equal(offsets, np.concatenate(([0], np.cumsum(sizes + 1)[:-1])))
    assert offsets[-1] + 1 + sizes[-1] == neighbours.size

    # Brute force for every off-grid point: sort the grid by (d², index), keep the first distance levels.
    for index, offset, size in zip(off_grid, offsets, sizes, strict=True):
        point = 2 * ((index >> (3 * np.arange(4))) & 7) + 1
        distances = np.sum((positions - point) ** 2, axis=1)
        order = np.lexsort((np.arange(grid_size), distances))
        kept = order[distances[order] <= np.unique(distances)[distance_levels - 1]]
        np.testing.assert_array_equal(neighbours[offset + 1 : offset + 1 + size], kept)


def test_tables_are_read_only():
    for table in iq3_tables(512):
        assert not table.flags.writeable


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", [kind for kind in ROW_KINDS if kind != "huge"])
def test_bytes_equal_ggml(name, with_imatrix, kind):
    x = make_rows(kind, 6, 512, seed=len(kind) + 7 * len(name))
    assert_same_as_ggml(name, x, make_imatrix(512) if with_imatrix else None)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("n_per_row", [256, 512, 1536])
def test_row_widths(name, n_per_row):
    x = make_rows("gaussian", 8, n_per_row, seed=n_per_row)
    assert_same_as_ggml(name, x, None)
    assert_same_as_ggml(name, x, make_imatrix(n_per_row, seed=n_per_row))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("magnitude", [1e-20, 1e-8, 1e-4, 1e4, 1e10])
def test_small_and_large_magnitudes(name, magnitude):
    # Beyond ~1e12 ggml's neighbour search overflows and aborts (see test_huge_rows_do_not_abort).
    x = (make_rows("heavy_tailed", 6, 512, seed=3) * np.float32(magnitude)).astype(np.float32)
    assert_same_as_ggml(name, x, None)
    assert_same_as_ggml(name, x, make_imatrix(512))


@pytest.mark.parametrize("name", TYPES)
def test_blocks_without_signal(name):
    """All-zero and below-threshold blocks among coded ones. IQ3_S then stores the following blocks'
    indices and signs one block early (ggml advances those pointers only past coded blocks), and a
    block whose imatrix is all zero wins no trial scale and codes levels 0."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[0, 0:32] = 0  # the first block zero
    x[1, 64:96] = 0
    x[1, 160:192] = 0
    x[2, 224:256] = 1e-9  # below IQ3_XXS's 1e-8, not zero for IQ3_S
    x[3, :256] = 0  # a whole zero super-block before a coded one
    x[4, 32:256] = 0  # only the first block coded
    x[5, 0:224] = 0  # only the last block coded
    imatrix = make_imatrix(512)
    imatrix[96:128] = 0
    imatrix[288:320] = 0
    assert_same_as_ggml(name, x, None)
    assert_same_as_ggml(name, x, imatrix)


@pytest.mark.parametrize("name", TYPES)
def test_huge_rows_do_not_abort(name):
    """At |x| ~ 1e30 every weighted error is inf: ggml fails GGML_ASSERT(grid_index >= 0) and aborts the
    process; the kernel takes the nearest neighbour instead and returns. The super-block scale is not
    finite (fp16 overflow, or inf/inf where the least-squares sums overflow), as for ggml where it runs."""
    x = make_rows("huge", 3, 512, seed=2)
    for imatrix in (None, make_imatrix(512)):
        q = quantize(name, x, imatrix)
        d = fp16_bits_to_fp32(q.reshape(-1, block_bytes(name))[:, :2].copy().view(np.uint16))
        assert not np.isfinite(d).any()


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_ggml_on_smollm2_ffn_down(ffn_down_rows, name):
    assert_same_as_ggml(name, ffn_down_rows, None)
    imatrix = np.abs(np.random.default_rng(7).standard_normal(1536)).astype(np.float32)
    assert_same_as_ggml(name, ffn_down_rows, imatrix)


# ---------------------------------------------------------------- dequantization


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "sparse", "all_zero", "subnormal"])
def test_dequantize_equals_gguf(name, kind):
    x = make_rows(kind, 4, 512, seed=11)
    q = quantize(name, x, make_imatrix(512))
    np.testing.assert_array_equal(dequantize(name, q), gguf.quants.dequantize(q, GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_random_blocks_equals_gguf(name):
    """Every grid index, sign pattern and scale nibble, not only those the quantizer emits."""
    rng = np.random.default_rng(13)
    blocks = rng.integers(0, 256, size=(64, block_bytes(name)), dtype=np.uint8)
    blocks[:, :2] = np.float16(rng.uniform(-2, 2, size=(64, 1))).view(np.uint8)
    q = blocks.reshape(8, -1)
    np.testing.assert_array_equal(dequantize(name, q), gguf.quants.dequantize(q, GGMLQuantizationType[name]))
