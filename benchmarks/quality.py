"""KL divergence of bpwopt's plans against llama.cpp's presets at the presets' own file sizes.

Every method quantizes from the off-grid F16 base (`bpwopt.quality.testbed`), so no
type is favoured by the source's grid. For each preset: the preset itself
(bpwopt's drop-in, byte-identical to llama-quantize), then bpwopt with each
method at a file size no larger than the preset's. KLD against the F16 base on
the evaluation text (`bpwopt.quality.texts`), through llama.cpp.

Methods:
  wsse         Σ w(x−x̂)², stored weights ignored (w = the imatrix; plain squared error without one)
  relative     each tensor's error over its own signal, stored weights ignored
  per-weight   relative times the tensor's number of weights, stored weights ignored (the flow without calibrate)
  calibrated   the default flow after `bpwopt calibrate` (--probe, --groups): the state's default objective
               weighted by the sensitivities it measured on the calibration text
  checked      calibrated, then the KLD check (`--check`, on after calibrate): that plan if it beats the largest
               preset that fits by two paired standard errors on the calibration text (with --rounding best,
               that preset's types in best rounding is a candidate too), else the preset (the row says which
               was kept)
  sensitivity  relative, weighted by noise-injection sensitivities (`bpwopt calibrate --probe noise`)
  tuned        sensitivity, times per-class and depth factors from `bpwopt tune` (optuna, KLD on the
               calibration text) at held-out budgets: bpw midway between the two smallest and between
               the two largest presets, never one of the sizes in the table (the factors tune stores:
               the untuned objective unless a trial beat it significantly)

--model gemma3 does the same for Gemma-3-270M (its off-grid base from the
shipped Q4_K_M). Rows are appended to --out as they are measured; a rerun skips rows already
there, and the state (measurements, sensitivities, the optuna study) resumes.

    python benchmarks/quality.py --imatrix no --out benchmarks/quality-smollm2.md
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bpwopt.cli.main import parse_candidates
from bpwopt.demo import gemma3_path, smollm2_path
from bpwopt.formats.gguf_reader import open_gguf
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.jobs.quantize import QuantizeJob, quantize_file
from bpwopt.quality.calibrate import DEFAULT_NOISE, DEFAULT_PROBE, PROBES, calibrate
from bpwopt.quality.evaluate import evaluate
from bpwopt.quality.guarantee import checked_optimize, format_check
from bpwopt.quality.testbed import make_off_grid
from bpwopt.quality.texts import evaluation_text
from bpwopt.quality.tune import tune
from bpwopt.quant.types import DEFAULT_ROUNDING, ROUNDINGS
from bpwopt.solve.objective import DEFAULT_GROUPING, GROUPINGS
from bpwopt.solve.targets import Target

REPO = Path(__file__).resolve().parent.parent
MODELS = {  # name -> (source GGUF, imatrix of its off-grid base from scripts/make_imatrix.sh)
    "smollm2": (smollm2_path, REPO / "data" / "smollm2-135m-offgrid-f16.imatrix.gguf"),
    "gemma3": (gemma3_path, REPO / "data" / "gemma3-270m-offgrid-f16.imatrix.gguf"),
}


def off_grid_base(model: str, work: Path) -> tuple[Path, Path]:
    """The model's off-grid F16 base in work (made there on first use) and the path of that base's imatrix."""
    work.mkdir(parents=True, exist_ok=True)
    source, imatrix_path = MODELS[model]
    base = work / f"{model}-offgrid-f16.gguf"
    if not base.exists():
        make_off_grid(source(), base)
    return base, imatrix_path


PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
METHODS = ["wsse", "relative", "per-weight", "calibrated", "checked", "sensitivity", "tuned"]
DEFAULT_METHODS = ["per-weight", "calibrated", "checked"]
HEADER = (
    "| preset | imatrix | method | file bytes | bpw | mean KLD | ± | p99 KLD | same top | PPL | KLD / preset |\n"
    "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    parser.add_argument("--probe", choices=PROBES, default=DEFAULT_PROBE, help="calibrate's probe (calibrated)")
    parser.add_argument("--groups", choices=GROUPINGS, default=DEFAULT_GROUPING, help="calibrate's groups")
    parser.add_argument("--imatrix", choices=["yes", "no"], default="yes")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=DEFAULT_ROUNDING,
                        help="bpwopt's quantizers for every method (the presets stay llama.cpp's)")  # fmt: skip
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE, help="calibration noise, rho^2")
    parser.add_argument("--calibration-chunks", type=int, default=2)
    parser.add_argument("--calibration-ctx", type=int, default=256)
    parser.add_argument("--trials", type=int, default=16, help="optuna trials for the tuned method")
    parser.add_argument("--chunks", type=int, default=None, help="evaluation windows (default: evaluate's)")
    parser.add_argument("--candidates", default=None, help="T1,T2,... as bpwopt's --candidates (default: bpwopt's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="directory for models and states (default: temp)")
    parser.add_argument("--out", type=Path, required=True, help="markdown table, appended to and resumed from")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bpwopt-quality-"))
    base, imatrix_path = off_grid_base(args.model, work)
    imatrix = imatrix_path if args.imatrix == "yes" else None
    label = "imat" if imatrix else "plain"
    if not args.out.exists():
        args.out.write_text(HEADER)
    done = measured_rows(args.out)
    bpwopt_label = label if args.rounding == DEFAULT_ROUNDING else f"{label}-{args.rounding}"  # its own states
    candidates = parse_candidates(args.candidates)
    if args.candidates:
        bpwopt_label += "-" + hashlib.sha256(",".join(t.name for t in candidates).encode()).hexdigest()[:8]
    measured = work / f"{args.model}-{bpwopt_label}.bpw_state"  # every candidate measured, nothing calibrated
    solve = OptimizeJob(
        input_path=base, output_path=None, target=Target(bits_per_weight=8.0), imatrix_path=imatrix,
        state_path=measured, objective="relative", rounding=args.rounding, candidates=candidates, progress=False,
    )  # fmt: skip
    presets = {
        name: quantize_preset(base, name, imatrix, work / f"{name}-{label}-preset.gguf") for name in args.presets
    }
    optimize_file(replace(solve, dry_run=True, ignore_importance=True))  # measures what the state lacks
    calibrated = {}  # method -> the state it solves from, calibrated as that method needs
    for method, probe, groups in (("calibrated", args.probe, args.groups), ("sensitivity", "noise", DEFAULT_GROUPING)):
        if method in args.methods or {method: "checked", "sensitivity": "tuned"}[method] in args.methods:
            calibrated[method] = work / f"{args.model}-{bpwopt_label}-{probe}-{groups}.bpw_state"
            if not calibrated[method].exists():
                shutil.copyfile(measured, calibrated[method])
            started = time.perf_counter()
            calibrate(
                base, calibrated[method], imatrix_path=imatrix, probe=probe, grouping=groups, noise=args.noise,
                chunks=args.calibration_chunks, ctx=args.calibration_ctx, threads=args.threads, progress=False,
            )  # fmt: skip  (resumes: values of the same settings are reused)
            print(f"calibrate --probe {probe} --groups {groups}: {time.perf_counter() - started:.1f} s", flush=True)
    solve = replace(solve, state_path=calibrated.get("sensitivity", measured))
    text, reference = evaluation_text(), {}
    for name, (preset_path, preset_bytes, preset_bpw) in presets.items():
        for method in ["preset", *args.methods]:  # the preset first: its KLD is the ratio's reference
            key = (name, args.imatrix, method)
            if key in done:
                reference.setdefault(name, done[key])
                continue
            path, file_bytes, bpw, kept = preset_path, preset_bytes, preset_bpw, method
            if method != "preset":  # every method at the preset's size
                out = work / f"{name}-{bpwopt_label}-{method}.gguf"
                job = method_job(solve, method, presets, args, out, preset_bytes)
                if method in ("calibrated", "checked"):  # the default flow after calibrate
                    job = replace(job, state_path=calibrated["calibrated"], objective=None)
                if method == "checked":
                    started = time.perf_counter()
                    check = checked_optimize(replace(job, record_plan=False), threads=args.threads)
                    kept = f"checked: kept {check.chosen.split(' (')[0]}"
                    print(f"{format_check(check)}\ncheck: {time.perf_counter() - started:.1f} s", flush=True)
                else:
                    optimize_file(job)
                    kept = method
                path, file_bytes, bpw = out, out.stat().st_size, file_bits_per_weight(out)
            result = evaluate(base, path, text, chunks=args.chunks, threads=args.threads, progress=False)
            reference.setdefault(name, result.mean_kld)
            with args.out.open("a") as table:
                table.write(
                    f"| {name} | {args.imatrix} | {kept} | {file_bytes:,} | {bpw:.4f} | {result.mean_kld:.5f} | "
                    f"{result.mean_kld_stderr:.5f} | {result.p99_kld:.4f} | {result.same_top_rate:.4f} | "
                    f"{result.ppl_quant:.3f} | {result.mean_kld / reference[name]:.2f} |\n"
                )
            print(f"{name} {method}: KLD {result.mean_kld:.5f}", flush=True)


def measured_rows(table: Path) -> dict[tuple[str, str, str], float]:
    """(preset, imatrix, method) -> mean KLD of the rows already in the table."""
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines()[2:] if line.startswith("|")]
    return {(r[0].strip(), r[1].strip(), r[2].split(":")[0].strip()): float(r[5]) for r in rows}


def file_bits_per_weight(path: Path) -> float:
    """8 × tensor bytes / weights of a written GGUF, as llama.cpp counts bpw."""
    tensors = open_gguf(path).tensors
    return 8.0 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def quantize_preset(base: Path, name: str, imatrix: Path | None, out: Path) -> tuple[Path, int, float]:
    report = quantize_file(QuantizeJob(base, out, name, imatrix_path=imatrix, progress=False))
    return out, report.file_bytes, report.bits_per_weight


def method_job(
    solve: OptimizeJob, method: str, presets: dict, args: argparse.Namespace, out: Path, file_bytes: int
) -> OptimizeJob:
    """The optimizer job of a method at one preset's size; `tuned` runs (or resumes) its study first."""
    job = replace(solve, output_path=out, target=Target(file_bytes=file_bytes), objective="relative")
    if method in ("wsse", "relative", "per-weight"):
        return replace(job, objective=method, ignore_importance=True)
    if method in ("sensitivity", "calibrated", "checked"):
        return replace(job, tuning={})
    report = tune(solve, held_out_budgets(presets), trials=args.trials, threads=args.threads, progress=False)
    return replace(job, tuning=report.chosen.tuning)


def held_out_budgets(presets: dict) -> list[Target]:
    """bpw midway between the two smallest and the two largest presets' sizes: budgets the table never uses."""
    bpws = sorted(bpw for _, _, bpw in presets.values())
    return [Target(bits_per_weight=round((bpws[0] + bpws[1]) / 2, 3)),
            Target(bits_per_weight=round((bpws[-2] + bpws[-1]) / 2, 3))]  # fmt: skip


if __name__ == "__main__":
    main()
