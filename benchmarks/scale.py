"""bpwopt's whole `--target-size` run against one llama.cpp Q4_K_M quantization, at 1B and 8B shapes.

For each shape, in one run: the Llama-shaped F16 model is generated
(benchmarks/synthetic_llama.py; kept in --work for the next run), llama.cpp
quantizes it to Q4_K_M (`llama_model_quantize` through llama-cpp-python), then
bpwopt runs what a user would run for a file of that size — measure every
default candidate of every tensor into a fresh state, solve, write —
`bpwopt --target-size <Q4_K_M's bytes> IN OUT THREADS`. Both run as
subprocesses under /usr/bin/time with the same thread count (wall seconds,
peak RSS of the child). bpwopt first runs untimed on the demo model so that
no Numba compilation is timed.

    python benchmarks/scale.py [--shapes 1b,8b] [--threads 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from dropin import Measurement, llama_command, timed
from synthetic_llama import SHAPES, write_synthetic_llama

from bpwopt.demo import smollm2_path

GIB = 2**30


def bpwopt_command(source: Path, output: Path, state: Path, size: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "bpwopt.cli", "--quiet", "--allow-requantize", "--state-file", str(state),
            "--target-size", str(size), str(source), str(output), str(threads)]  # fmt: skip


def warm_numba(work: Path, threads: int) -> None:
    state = work / "warm.bpw_state"
    state.unlink(missing_ok=True)  # a state of an older bpwopt's sampling would be refused
    command = bpwopt_command(smollm2_path(), work / "warm.gguf", state, 80_000_000, threads)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def measure_shape(name: str, work: Path, threads: int) -> tuple[int, int, Measurement, Measurement]:
    """(model bytes, Q4_K_M bytes, llama.cpp's run, bpwopt's run) for one shape."""
    model = work / f"llama-{name}-f16.gguf"
    if not model.exists():
        write_synthetic_llama(SHAPES[name], model)
    preset, planned, state = work / f"{name}-q4_k_m.gguf", work / f"{name}-bpwopt.gguf", work / f"{name}.bpw_state"
    llama = timed(llama_command(model, preset, "Q4_K_M", threads), work)
    size = preset.stat().st_size
    preset.unlink()
    state.unlink(missing_ok=True)  # a fresh state: the first run's whole cost
    ours = timed(bpwopt_command(model, planned, state, size, threads), work)
    if planned.stat().st_size > size:
        raise SystemExit(f"bpwopt wrote {planned.stat().st_size:,} bytes for a {size:,}-byte target")
    planned.unlink()
    return model.stat().st_size, size, llama, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keeps the generated models (default: a temporary)")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        raise SystemExit(f"unknown shape(s) {unknown}; known: {sorted(SHAPES)}")
    with tempfile.TemporaryDirectory(prefix="bpwopt-scale-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        warm_numba(work, args.threads)
        print(f"threads: {args.threads}\n")
        print("| shape | F16 model | Q4_K_M file | llama.cpp Q4_K_M s | bpwopt --target-size s | ratio "
              "| llama.cpp peak RSS | bpwopt peak RSS |")  # fmt: skip
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name in shapes:
            model_bytes, size, llama, ours = measure_shape(name, work, args.threads)
            ratio = ours.wall_seconds / llama.wall_seconds
            print(f"| {SHAPES[name].name} | {model_bytes / GIB:.2f} GiB | {size:,} | {llama.wall_seconds:.1f} "
                  f"| {ours.wall_seconds:.1f} | {ratio:.2f} | {llama.peak_rss_bytes / GIB:.2f} GiB "
                  f"| {ours.peak_rss_bytes / GIB:.2f} GiB |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
