"""The optimizer's cost: measuring every candidate on SmolLM2 against one llama.cpp Q4_K_M quantization.

Three commands as subprocesses under /usr/bin/time, interleaved in one run
(wall seconds, peak RSS): llama.cpp's `llama_model_quantize` to Q4_K_M, then
`bpwopt --target-bpw 5.5 --dry-run` on a fresh state (measures all 11 default
candidates of every tensor, with the demo imatrix), then the same command on
the now-complete state (re-solve: opens the model, measures nothing). bpwopt
runs once untimed first so that no Numba compilation is timed.

    python benchmarks/optimizer.py [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from dropin import best, llama_command, timed

from bpwopt.demo import smollm2_path

IMATRIX = Path(__file__).resolve().parent.parent / "data" / "smollm2-135m-q4_1.imatrix.gguf"


def bpwopt_command(source: Path, state: Path, threads: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "bpwopt.cli", "--allow-requantize", "--quiet", "--imatrix", str(IMATRIX),
        "--state-file", str(state), "--target-bpw", "5.5", "--dry-run", *extra, str(source), str(threads),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    source = smollm2_path()
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        subprocess.run(bpwopt_command(source, scratch / "warmup.bpw_state", args.threads), check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        llama, measure, resolve = [], [], []
        for repeat in range(args.repeats):
            llama.append(timed(llama_command(source, scratch / "q4_k_m.gguf", "Q4_K_M", args.threads), scratch))
            state = scratch / f"run{repeat}.bpw_state"
            measure.append(timed(bpwopt_command(source, state, args.threads), scratch))
            resolve.append(timed(bpwopt_command(source, state, args.threads), scratch))
        summary = subprocess.run(bpwopt_command(source, state, args.threads, "--json"), check=True,
                                 capture_output=True, text=True)  # fmt: skip
        report = json.loads(summary.stdout)
    reference = best(llama)
    pairs = report["measured"] + report["reused"]
    print(f"SmolLM2-135M, {args.threads} threads, best of {args.repeats}; {pairs} (tensor, type) pairs; "
          f"solver alone {report['solve_seconds']:.3f} s")  # fmt: skip
    print()
    print("| run | wall s | × llama.cpp Q4_K_M | peak RSS MiB | × llama.cpp |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, runs in (
        ("llama.cpp Q4_K_M (llama_model_quantize)", llama),
        ("bpwopt: measure all candidates + solve", measure),
        ("bpwopt: re-solve from the state", resolve),
    ):
        m = best(runs)
        print(f"| {label} | {m.wall_seconds:.1f} | {m.wall_seconds / reference.wall_seconds:.2f} | "
              f"{m.peak_rss_bytes / 2**20:.0f} | {m.peak_rss_bytes / reference.peak_rss_bytes:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
