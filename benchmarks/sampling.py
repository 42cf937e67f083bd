"""The adaptive row sample against a precise measurement: time, plans, and the plans' KLD.

For one model (off-grid F16 base, with or without its imatrix), every default
candidate of every tensor is measured once precisely (every row) and once per
--rse (`Sampling(rse=X)`: a tensor's sample grows from 64 rows until each
error's relative standard error is at most X, or 1,024 rows). At the size of
each llama.cpp preset, each state's plan (the default objective, no
calibration) is solved, and judged by the precise state: its error under the
precise measurements, relative to the precise plan's (which is the optimum of
that objective, so the ratio is ≥ 1 up to the solver's gap). With --kld, the
plans of the first --rse and the precise plan are written where they differ
and their KLD against the base is measured on the evaluation text, paired per
token (`bpwopt.quality.guarantee.paired_difference`).

    python benchmarks/sampling.py --model smollm2 --imatrix yes --rse 0.05 0.1 0.02 --kld --work W --out s.md
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from quality import MODELS, PRESETS, off_grid_base, quantize_preset

from bpwopt.jobs.optimize import OptimizeJob, OptimizeReport, optimize_file
from bpwopt.measure.measure import Sampling
from bpwopt.quality.evaluate import evaluate
from bpwopt.quality.guarantee import paired_difference
from bpwopt.quality.texts import evaluation_text
from bpwopt.solve.problem import tensor_options
from bpwopt.solve.targets import Target
from bpwopt.state.store import StateFile, read_identity


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--imatrix", choices=["yes", "no"], default="yes")
    parser.add_argument("--rse", type=float, nargs="+", default=[Sampling.rse])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sample seeds of each --rse")
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--kld", action="store_true", help="write and evaluate the first --rse's plans")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, required=True, help="directory for models and states")
    parser.add_argument("--out", type=Path, required=True, help="markdown report, appended to")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    base, imatrix_path = off_grid_base(args.model, args.work)
    imatrix = imatrix_path if args.imatrix == "yes" else None
    label = f"{args.model}-{'imat' if imatrix else 'plain'}"
    samplings = {"precise": Sampling(precise=True)}
    samplings |= {f"rse {rse:g} seed {seed}": Sampling(rse=rse, seed=seed) for rse in args.rse for seed in args.seeds}
    job = OptimizeJob(input_path=base, output_path=None, target=Target(bits_per_weight=8.0), imatrix_path=imatrix,
                      dry_run=True, progress=False, record_plan=False)  # fmt: skip
    jobs = {
        name: replace(job, sampling=s, state_path=args.work / f"{label}-{name.replace(' ', '-')}.bpw_state")
        for name, s in samplings.items()
    }
    lines = [f"\n{label}: measuring every default candidate (a fresh state's run; s: the measure stage)\n",
             "| sampling | pairs | left at a small sample as dominated | rows measured | measure s |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, sampled in jobs.items():
        report = optimize_file(sampled)
        with _opened(sampled.state_path) as state:
            rows = sum(m.rows_measured for m in state.measurements().values())
        seconds = f"{report.measure_seconds:.1f}" if report.measured else "(state reused)"
        lines.append(f"| {name} | {report.measured + report.reused} | {report.dominated} | {rows:,} | {seconds} |")
    print("\n".join(lines), flush=True)
    precise_error = precise_judge(jobs["precise"].state_path, "per-weight")
    lines += [f"\n{label}: plans at each preset's size, judged by the precise measurements "
              "(error / the precise plan's; tensors whose type differs from the precise plan's)\n",
              "| size of | " + " | ".join(n for n in jobs if n != "precise") + " |",
              "| --- |" + " ---: |" * (len(jobs) - 1)]  # fmt: skip
    text = evaluation_text() if args.kld else None
    klds = []
    for preset in args.presets:
        _, preset_bytes, _ = quantize_preset(base, preset, imatrix, args.work / f"{preset}-{label}.gguf")
        plans = {name: optimize_file(replace(j, target=Target(file_bytes=preset_bytes))) for name, j in jobs.items()}
        reference = precise_error(plans["precise"])
        cells = []
        for name, report in plans.items():
            if name != "precise":
                changed = sum(a.qtype != b.qtype for a, b in zip(report.tensors, plans["precise"].tensors, strict=True))
                cells.append(f"{precise_error(report) / reference:.4f} ({changed})")
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        if text is not None:
            klds.append((preset, *kld_pair(jobs, plans, preset_bytes, base, text, args)))
    if klds:
        first = next(n for n in jobs if n != "precise")
        lines += [f"\n{label}: KLD against the base on the evaluation text, {first} against precise\n",
                  f"| size of | precise | {first} | paired difference ({first} − precise) |",
                  "| --- | ---: | ---: | ---: |"]  # fmt: skip
        lines += [f"| {preset} | {a} | {b} | {d} |" for preset, a, b, d in klds]
    with args.out.open("a") as out:
        out.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def precise_judge(state_path: Path, objective: str):
    """A function giving a plan's error under the precise state's measurements and the objective."""
    with _opened(state_path) as state:
        measurements, records = state.measurements(), state.tensors()
    options = {}
    for name, record in records.items():
        measured = [m for (tensor, _), m in measurements.items() if tensor == name]
        options[name] = tensor_options(name, measured, record, objective)

    def error(report: OptimizeReport) -> float:
        total = 0.0
        for tensor in report.tensors:
            if tensor.varied:
                chosen = options[tensor.name]
                total += float(chosen.error[chosen.labels.index(tensor.qtype)])
        return total

    return error


def _opened(path: Path) -> StateFile:
    return StateFile.open(path, read_identity(path), create=False)


def kld_pair(jobs, plans, preset_bytes, base, text, args) -> tuple[str, str, str]:
    """Write the precise plan and the first sampled plan at this size; their KLDs and the paired difference."""
    first = next(n for n in jobs if n != "precise")
    if [t.qtype for t in plans[first].tensors] == [t.qtype for t in plans["precise"].tensors]:
        return "same plan", "same plan", "0"
    results = []
    for name in ("precise", first):
        out = args.work / f"plan-{jobs[name].state_path.stem}-{preset_bytes}.gguf"
        optimize_file(replace(jobs[name], target=Target(file_bytes=preset_bytes), output_path=out, dry_run=False))
        results.append(evaluate(base, out, text, threads=args.threads, progress=False))
    difference, stderr = paired_difference(results)
    a, b = (f"{r.mean_kld:.5f} ± {r.mean_kld_stderr:.5f}" for r in results)
    return a, b, f"{difference:+.5f} ± {stderr:.5f}"


if __name__ == "__main__":
    main()
