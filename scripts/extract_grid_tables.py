"""Rebuild bpwopt/quant/tables/grids.npz: the lattice grids the i-quant formats are defined by.

The i-quant types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) store, per group of 8 (or 4)
weights, an index into a fixed table of points; the table is part of the file format, so a file is only
readable by llama.cpp if it uses llama.cpp's tables. They are data, not code: this script reads them from
ggml's `ggml-common.h` (the `GGML_TABLE_BEGIN(type, name, size) ... GGML_TABLE_END()` blocks) and stores
each as a numpy array of its C type, with the header's sha256 for provenance.

Usage: python scripts/extract_grid_tables.py LLAMA_CPP_SOURCE_DIR
  LLAMA_CPP_SOURCE_DIR  a llama.cpp checkout (e.g. the vendor/llama.cpp of the llama-cpp-python sdist)
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np

TABLES = ("kmask_iq2xs", "ksigns_iq2xs", "iq2xxs_grid", "iq2xs_grid", "iq2s_grid", "iq3xxs_grid", "iq3s_grid",
          "iq1s_grid", "kvalues_fp4")  # fmt: skip
C_TYPES = {"uint8_t": np.uint8, "int8_t": np.int8, "uint32_t": np.uint32, "uint64_t": np.uint64}
OUTPUT = Path(__file__).resolve().parents[1] / "bpwopt" / "quant" / "tables" / "grids.npz"


def read_tables(header: str) -> dict[str, np.ndarray]:
    """Every GGML_TABLE of the header named in TABLES, as an array of its C type (first definition wins)."""
    pattern = re.compile(r"GGML_TABLE_BEGIN\((\w+),\s*(\w+),\s*(\w+)\)(.*?)GGML_TABLE_END\(\)", re.S)
    tables: dict[str, np.ndarray] = {}
    for c_type, name, _size, body in pattern.findall(header):
        if name in TABLES and name not in tables:
            values = [int(token, 0) for token in re.findall(r"-?(?:0x[0-9a-fA-F]+|\d+)", body)]
            tables[name] = np.array(values, dtype=np.int64 if c_type.startswith("int") else np.uint64).astype(
                C_TYPES[c_type])
    missing = sorted(set(TABLES) - set(tables))
    if missing:
        raise SystemExit(f"not found in the header: {', '.join(missing)}")
    return tables


def main(source_dir: str) -> None:
    header_path = Path(source_dir) / "ggml" / "src" / "ggml-common.h"
    header = header_path.read_text()
    tables = read_tables(header)
    sha = hashlib.sha256(header.encode()).hexdigest()
    np.savez_compressed(OUTPUT, **tables, source_sha256=np.array(sha))
    sizes = ", ".join(f"{name} {array.size}" for name, array in tables.items())
    print(f"wrote {OUTPUT} from {header_path} (sha256 {sha[:12]}): {sizes}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[-1])
    main(sys.argv[1])
