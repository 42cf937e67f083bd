"""The fixed tables the i-quant and FP4 formats are defined by, as ggml's `ggml-common.h` gives them.

grids.npz is rebuilt by scripts/extract_grid_tables.py; each table keeps its C type (uint64 grids of 8
signed or unsigned bytes, uint32 grids of 4 bytes, uint8/int8 small tables).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

GRIDS_FILE = Path(__file__).with_name("grids.npz")


@functools.cache
def _tables() -> dict[str, np.ndarray]:
    with np.load(GRIDS_FILE) as archive:
        return {name: archive[name] for name in archive.files}


def grid_table(name: str) -> np.ndarray:
    """The table NAME (e.g. "iq2xxs_grid"), read-only; KeyError for a name the file does not hold."""
    table = _tables()[name]
    table.flags.writeable = False
    return table
