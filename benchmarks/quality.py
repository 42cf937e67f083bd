"""KL divergence of bpwopt's plans against llama.cpp's presets at the presets' own file sizes.

Every method quantizes from the off-grid F16 base (`bpwopt.testbed`), so no
type is favoured by the source's grid. For each preset: the preset itself
(bpwopt's drop-in, byte-identical to llama-quantize), then bpwopt with each
objective at a file size no larger than the preset's. KLD against the F16
base on the evaluation text (`bpwopt.texts`), through llama.cpp.

Methods: `relative` and `wsse` are the objectives alone (stored group weights
ignored); `sensitivity` is `relative` weighted by noise-injection
sensitivities (`bpwopt.calibrate`, measured on the calibration text and stored
in the state; a calibration already in the state with the same settings is
reused).

    python benchmarks/quality.py --presets Q3_K_M Q4_K_M --objectives relative wsse sensitivity
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from bpwopt.calibrate import DEFAULT_CHUNKS, DEFAULT_NOISE, calibrate
from bpwopt.demo import smollm2_path
from bpwopt.evaluate import evaluate
from bpwopt.measure import Sampling
from bpwopt.optimizer import OptimizeJob, optimize_file
from bpwopt.pipeline import QuantizeJob, quantize_file
from bpwopt.policy import QuantizeOptions
from bpwopt.targets import Target
from bpwopt.testbed import make_off_grid
from bpwopt.texts import evaluation_text

REPO = Path(__file__).resolve().parent.parent
IMATRIX = {"smollm2": REPO / "data" / "smollm2-135m-offgrid-f16.imatrix.gguf"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["Q3_K_M", "Q4_K_M"])
    parser.add_argument("--objectives", nargs="+", default=["relative", "wsse", "sensitivity"], metavar="METHOD",
                        help="relative, wsse, sensitivity (relative weighted by calibrated sensitivities)")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE, help="calibration noise, rho^2")
    parser.add_argument("--calibration-chunks", type=int, default=DEFAULT_CHUNKS)
    parser.add_argument("--calibration-ctx", type=int, default=512)
    parser.add_argument("--imatrix", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--chunks", type=int, default=None, help="evaluation windows (default: evaluate's)")
    parser.add_argument("--work", type=Path, default=None, help="directory for models and states (default: temp)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bpwopt-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "smollm2-offgrid-f16.gguf"
    if not base.exists():
        make_off_grid(smollm2_path(), base)
    text = evaluation_text()
    print("| preset | imatrix | method | file bytes | bpw | mean KLD | ± | p99 KLD | same top | PPL | KLD / preset |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for use_imatrix in {"yes": [True], "no": [False], "both": [False, True]}[args.imatrix]:
        imatrix = IMATRIX["smollm2"] if use_imatrix else None
        for preset in args.presets:
            reference = None
            out = work / f"{preset}-{'imat' if use_imatrix else 'plain'}-preset.gguf"
            report = quantize_file(QuantizeJob(base, out, preset, imatrix_path=imatrix, progress=False))
            rows = [("preset", report.file_bytes, report.bits_per_weight, out)]
            for objective in args.objectives:
                out = work / f"{preset}-{'imat' if use_imatrix else 'plain'}-{objective}.gguf"
                job = OptimizeJob(
                    input_path=base,
                    output_path=out,
                    target=Target(file_bytes=report.file_bytes),
                    options=QuantizeOptions(),
                    imatrix_path=imatrix,
                    sampling=Sampling(),
                    state_path=work / f"smollm2-{'imat' if use_imatrix else 'plain'}.bpw_state",
                    objective="relative" if objective == "sensitivity" else objective,
                    ignore_importance=objective != "sensitivity",
                    progress=False,
                )
                if objective == "sensitivity":
                    optimize_file(replace(job, dry_run=True, ignore_importance=True))  # measures what is missing
                    calibrate(
                        base, job.state_path, imatrix_path=imatrix, noise=args.noise, chunks=args.calibration_chunks,
                        ctx=args.calibration_ctx, progress=False,
                    )  # fmt: skip
                plan = optimize_file(job)
                rows.append((objective, plan.file_bytes, plan.bits_per_weight, out))
            for method, file_bytes, bpw, path in rows:
                result = evaluate(base, path, text, chunks=args.chunks, progress=False)
                reference = reference or result.mean_kld
                print(
                    f"| {preset} | {'yes' if use_imatrix else 'no'} | {method} | {file_bytes:,} | {bpw:.4f} | "
                    f"{result.mean_kld:.5f} | {result.mean_kld_stderr:.5f} | {result.p99_kld:.4f} | "
                    f"{result.same_top_rate:.4f} | {result.ppl_quant:.3f} | {result.mean_kld / reference:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
