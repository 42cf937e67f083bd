"""Wall time and peak memory of `bpwopt IN OUT TYPE` against llama.cpp's llama_model_quantize.

Both run as subprocesses under `/usr/bin/time` (wall seconds and maximum
resident set size of the child), on the same input, with the same thread
count, interleaved in one run so that both see the same machine load. bpwopt
is run once untimed per model and preset first, so its Numba cache is warm
and no compilation is timed. llama.cpp is reached through llama-cpp-python
(`llama_cpp.llama_model_quantize`) in a fresh interpreter, so both pay for
starting Python and importing their package. The table gives the best of
--repeats runs of each and the ratios bpwopt / llama.cpp (> 1: bpwopt slower
or larger); "of which --dry-run" is the same bpwopt command with --dry-run
(start, open the input, plan; no quantizing, no writing). It also times
opening each input in this process, with bpwopt's reader
(`bpwopt.formats.gguf_reader.LazyGGUFReader`) and with the gguf package's
`GGUFReader` it replaced.

    python benchmarks/dropin.py [--models smollm2,gemma3] [--presets Q4_K_M,Q8_0] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp

from bpwopt import __version__
from bpwopt.demo import gemma3_path, smollm2_path
from bpwopt.formats.gguf_reader import LazyGGUFReader
from bpwopt.policy.presets import PRESETS_BY_NAME

MODELS = {"smollm2": smollm2_path, "gemma3": gemma3_path}
MODEL_LABELS = {"smollm2": "SmolLM2-135M (Q4_1)", "gemma3": "Gemma-3-270M (Q4_K_M)"}

_LLAMA_SCRIPT = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.allow_requantize, params.nthread = int(sys.argv[3]), True, int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


@dataclass(frozen=True)
class Measurement:
    wall_seconds: float
    peak_rss_bytes: int


def timed(command: list[str], scratch: Path) -> Measurement:
    """Run command under /usr/bin/time; wall seconds and the child's maximum resident set size."""
    report = scratch / "time.txt"
    result = subprocess.run(
        ["/usr/bin/time", "-o", str(report), "-f", "%e %M", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command[:3])} …\n{result.stderr[-2000:]}")
    wall, max_kib = report.read_text().split()[-2:]
    return Measurement(float(wall), int(max_kib) * 1024)


def bpwopt_command(source: Path, output: Path, preset: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "bpwopt.cli", "--allow-requantize", "--quiet", str(source), str(output), preset,
            str(threads)]  # fmt: skip


def llama_command(source: Path, output: Path, preset: str, threads: int) -> list[str]:
    ftype = int(PRESETS_BY_NAME[preset].ftype)
    return [sys.executable, "-c", _LLAMA_SCRIPT, str(source), str(output), str(ftype), str(threads)]


def best(measurements: list[Measurement]) -> Measurement:
    return Measurement(min(m.wall_seconds for m in measurements), min(m.peak_rss_bytes for m in measurements))


def reader_seconds(reader: type, path: Path) -> float:
    start = time.perf_counter()
    reader(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--presets", default="Q4_K_M,Q8_0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    models, presets = args.models.split(","), args.presets.split(",")
    rows, readers = [], {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        for model in models:
            source = MODELS[model]()
            readers[model] = reader_seconds(LazyGGUFReader, source), reader_seconds(gguf.GGUFReader, source)
            for preset in presets:
                ours_path, theirs_path = scratch / "bpwopt.gguf", scratch / "llama.gguf"
                timed(bpwopt_command(source, ours_path, preset, args.threads), scratch)  # warms the Numba cache
                ours, theirs, planned = [], [], []
                for _ in range(args.repeats):
                    ours.append(timed(bpwopt_command(source, ours_path, preset, args.threads), scratch))
                    theirs.append(timed(llama_command(source, theirs_path, preset, args.threads), scratch))
                    dry_run = [*bpwopt_command(source, ours_path, preset, args.threads), "--dry-run"]
                    planned.append(timed(dry_run, scratch))
                rows.append((model, preset, best(ours), best(theirs), best(planned)))
                print(f"{model} {preset}: done", file=sys.stderr)
    load_after = os.getloadavg()[0]
    print(format_table(rows, args.threads))
    print()
    opened = ", ".join(f"{MODEL_LABELS[m]} {ours:.3f} s ({theirs:.1f} s)" for m, (ours, theirs) in readers.items())
    print(f"Opening the input with bpwopt's reader (gguf.GGUFReader's in brackets), in this process: {opened}.")
    print(
        f"Best of {args.repeats} runs each, interleaved, after one untimed bpwopt run per row (Numba cache warm); "
        f"{args.threads} threads for both. bpwopt {__version__}, llama-cpp-python {llama_cpp.__version__}, "
        f"gguf {importlib.metadata.version('gguf')}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} cores; load average {load_before:.1f} before, {load_after:.1f} after."
    )


def format_table(rows, threads: int) -> str:
    lines = [
        "| model | preset | threads | bpwopt wall (s) | of which --dry-run (s) | llama.cpp wall (s) | wall ratio "
        "| bpwopt peak RSS (MiB) | llama.cpp peak RSS (MiB) | RSS ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, preset, ours, theirs, planned in rows:
        lines.append(
            f"| {MODEL_LABELS[model]} | {preset} | {threads} | {ours.wall_seconds:.2f} | {planned.wall_seconds:.2f} "
            f"| {theirs.wall_seconds:.2f} | {ours.wall_seconds / theirs.wall_seconds:.1f} "
            f"| {ours.peak_rss_bytes / 2**20:.0f} | {theirs.peak_rss_bytes / 2**20:.0f} "
            f"| {ours.peak_rss_bytes / theirs.peak_rss_bytes:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
