"""The rounding gain alone: `--rounding best` against ggml's quantizers, in the same block formats.

Two tables, on the off-grid F16 base of a model (`bpwopt.quality.testbed`, so
no type is favoured by the source's grid), with and without its imatrix:

* errors: for every type with a `best` kernel, Σ w (x − x̂)² (w = the imatrix,
  1 without one) over 64 seeded rows of every 2-D weight tensor the type fits,
  with each rounding, and the single-thread time of each;
* kld: pure-type files (the drop-in's `--pure TYPE`, both roundings) and their
  KL divergence against the base on the evaluation text, with the paired
  difference best − ggml and its standard error (the same tokens are scored).

    python benchmarks/rounding.py --model smollm2 --part errors kld --work W --out rounding-smollm2.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numba
import numpy as np
from quality import MODELS, off_grid_base

from bpwopt.formats.gguf_reader import open_gguf
from bpwopt.formats.imatrix import load_imatrix
from bpwopt.jobs.quantize import QuantizeJob, quantize_file
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.quality.evaluate import evaluate
from bpwopt.quality.guarantee import paired_difference
from bpwopt.quality.texts import evaluation_text
from bpwopt.quant import codec
from bpwopt.quant.kernels import best_rounding, best_rounding_super
from bpwopt.quant.types import get_quant_type
from bpwopt.source.rows import rows_to_float, tensor_rows

TYPES = [t.name for t in best_rounding.KERNELS | best_rounding_super.KERNELS]
ROWS_PER_TENSOR = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--part", nargs="+", choices=["errors", "kld"], default=["errors", "kld"])
    parser.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    parser.add_argument("--imatrix", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    parser.add_argument("--chunks", type=int, default=None, help="evaluation windows (default: evaluate's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, required=True, help="directory for the base and the pure files")
    parser.add_argument("--out", type=Path, required=True, help="markdown tables, appended to")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    base, imatrix_path = off_grid_base(args.model, args.work)
    imatrices = {flag: imatrix_path if flag == "yes" else None for flag in args.imatrix}
    with args.out.open("a") as out:
        if "errors" in args.part:
            out.write(error_table(base, imatrices, args.types, args.model))
            out.flush()
        if "kld" in args.part:
            kld_table(base, imatrices, args, out)


def sampled_rows(base: Path) -> dict[str, np.ndarray]:
    """64 seeded rows (float32) of every 2-D weight tensor of the base."""
    rows = {}
    for tensor in open_gguf(base).tensors:
        if len(tensor.shape) != 2 or not tensor.name.endswith(".weight"):
            continue
        raw = tensor_rows(tensor)
        picked = np.random.default_rng(len(rows)).choice(raw.shape[0], min(ROWS_PER_TENSOR, raw.shape[0]), False)
        rows[tensor.name] = np.ascontiguousarray(rows_to_float(raw[np.sort(picked)], tensor.tensor_type, tensor.name))
    return rows


def error_table(base: Path, imatrices: dict[str, Path | None], types: list[str], model: str) -> str:
    """Σ w (x − x̂)² and single-thread seconds of each rounding, summed over the sampled rows."""
    rows = sampled_rows(base)
    numba.set_num_threads(1)
    lines = [
        f"\n{model}, weighted squared error over {ROWS_PER_TENSOR} rows of every 2-D weight tensor, one thread:\n\n"
        "| type | imatrix | tensors | ggml error | best error | best / ggml | ggml s | best s | time ratio |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    ]
    for flag, path in imatrices.items():
        imatrix = load_imatrix(path) if path is not None else None
        for name in types:
            block = get_quant_type(name).block_size
            totals = {"ggml": [0.0, 0.0], "best": [0.0, 0.0]}
            fitting = [n for n, x in rows.items() if x.shape[1] % block == 0]
            for tensor_name in fitting:
                x = rows[tensor_name]
                weights = imatrix.weights_for(tensor_name, x.shape[1], 1) if imatrix is not None else None
                weights = weights[0] if weights is not None else None
                for rounding, total in totals.items():
                    codec.quant_error(x[:1], name, weights, rounding)  # compiled before it is timed
                    started = time.perf_counter()
                    total[0] += codec.quant_error(x, name, weights, rounding)[0]
                    total[1] += time.perf_counter() - started
            (ggml, ggml_s), (best, best_s) = totals["ggml"], totals["best"]
            lines.append(
                f"| {name} | {flag} | {len(fitting)} | {ggml:.6g} | {best:.6g} | {best / ggml:.4f} | "
                f"{ggml_s:.2f} | {best_s:.2f} | {best_s / ggml_s:.1f} |\n"
            )
            print(lines[-1], end="", flush=True)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return "".join(lines)


def kld_table(base: Path, imatrices: dict[str, Path | None], args: argparse.Namespace, out) -> None:
    """KLD of each pure-type file with each rounding; the paired difference names the gain and its noise."""
    out.write(
        f"\n{args.model}, pure-type files (`--pure TYPE`), KLD against the base on the evaluation text:\n\n"
        "| type | imatrix | file bytes | ggml KLD | ± | best KLD | ± | best − ggml (paired) | ± | best / ggml |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    text = evaluation_text()
    for flag, imatrix in imatrices.items():
        for name in args.types:
            results, sizes = [], []
            for rounding in ("ggml", "best"):
                path = args.work / f"{args.model}-pure-{name}-{flag}-{rounding}.gguf"
                if not path.exists():
                    job = QuantizeJob(base, path, name, QuantizeOptions(pure=True), imatrix_path=imatrix,
                                      rounding=rounding, progress=False)  # fmt: skip
                    quantize_file(job)
                sizes.append(path.stat().st_size)
                results.append(evaluate(base, path, text, chunks=args.chunks, threads=args.threads, progress=False))
            assert sizes[0] == sizes[1], "the same format must give the same size"
            difference, stderr = paired_difference(results)
            ggml, best = results
            out.write(
                f"| {name} | {flag} | {sizes[0]:,} | {ggml.mean_kld:.5f} | {ggml.mean_kld_stderr:.5f} | "
                f"{best.mean_kld:.5f} | {best.mean_kld_stderr:.5f} | {difference:+.5f} | {stderr:.5f} | "
                f"{best.mean_kld / ggml.mean_kld:.3f} |\n"
            )
            out.flush()
            print(f"{name} {flag}: ggml {ggml.mean_kld:.5f} best {best.mean_kld:.5f} "
                  f"({difference:+.5f} ± {stderr:.5f}{' significant' if abs(difference) > 2 * stderr else ''})",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
