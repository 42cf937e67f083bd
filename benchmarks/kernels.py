"""Single-thread quantization throughput of bpwopt's Numba kernels against ggml's C.

For every registered type, with and without an importance matrix, both
quantize the same float32 matrix in the same run; the table gives MB/s of
float32 input (best of --repeats) and the ratio bpwopt / ggml (≥ 1 means
bpwopt is faster). It also times Numba's compilation of all kernels with an
empty cache and with the cache warm, each in a fresh interpreter.

    python benchmarks/kernels.py [--rows 256] [--cols 4096] [--repeats 3] [--types IQ2_XXS,TQ1_0]

Types that ggml quantizes only with an imatrix (IQ2_XXS, IQ2_XS, IQ1_S) are timed with one only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from functools import partial

import numba
import numpy as np
from timing import best_seconds

import bpwopt
from bpwopt.quant.reference import ggml_quantize
from bpwopt.quant.types import QUANT_TYPES, get_quant_type

_COMPILE_PROBE = (
    "import time; t = time.perf_counter(); import numpy as np, bpwopt; "
    "x = np.ones((1, 256), np.float32); w = np.ones(256, np.float32); "
    "[bpwopt.quant_error(x, n, w) for n in bpwopt.QUANT_TYPES]; "
    "print(time.perf_counter() - t)"
)


def compile_seconds(cache_dir: str) -> float:
    """Seconds for a fresh interpreter to import bpwopt and run every kernel once."""
    environment = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_PROBE], env=environment, capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", help="comma-separated type names (default: every registered type)")
    parser.add_argument("--skip-compile", action="store_true", help="do not time compilation")
    args = parser.parse_args()
    names = args.types.upper().split(",") if args.types else [t.name for t in QUANT_TYPES.values()]

    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    imatrix = (rng.exponential(1.0, args.cols) ** 2).astype(np.float32)
    megabytes = x.nbytes / 1e6

    print(f"single thread, {args.rows} x {args.cols} float32 gaussian ({megabytes:.1f} MB), "
          f"best of {args.repeats}; numba {numba.__version__}")
    print("| type | imatrix | bpwopt MB/s | ggml MB/s | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for quant_type in map(get_quant_type, names):
        for weights in (None, imatrix):
            unweighted = quant_type.block_size == 1  # the float types take no imatrix
            if (weights is not None and unweighted) or (weights is None and quant_type.requires_imatrix):
                continue
            bpwopt.quantize(x[:2], quant_type.name, weights)  # compile / load before timing
            ours = best_seconds(partial(bpwopt.quantize, x, quant_type.name, weights), args.repeats)
            theirs = best_seconds(partial(ggml_quantize, x, quant_type.name, weights), args.repeats)
            print(f"| {quant_type.name} | {'yes' if weights is not None else 'no'} | "
                  f"{megabytes / ours:.1f} | {megabytes / theirs:.1f} | {theirs / ours:.2f} |")

    if not args.skip_compile:
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = compile_seconds(cache_dir)
            warm = compile_seconds(cache_dir)
        print()
        print("| numba compilation of all kernels (fresh interpreter) | seconds |")
        print("| --- | ---: |")
        print(f"| empty cache (first use) | {cold:.1f} |")
        print(f"| warm cache | {warm:.1f} |")


if __name__ == "__main__":
    main()
