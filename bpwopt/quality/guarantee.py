"""The guarantee: never hand a user a plan the evidence says is worse than llama.cpp's preset of the same size.

The solver minimizes a prediction of the damage; at the sizes people use a
handful of tensors decides the result, and a prediction can be wrong there
(benchmarks/RESULTS.md). So when measured evidence is at hand — llama.cpp's
runtime and the calibration text, which `bpwopt calibrate` has already used —
the optimizer writes its plan and the largest llama.cpp preset that fits the
same budget, both to temporaries beside the output (beside the file a link
names; in a temporary directory for a device or FIFO), and measures each one's
KL divergence against the input model on the calibration text (never the
evaluation text). With a rounding other than ggml's (`--rounding best`) the
preset's own types written with that rounding are a third candidate: where the
preset's allocation beats the plan, the user still gets the better blocks.
The preset as llama.cpp writes it is the reference: a candidate is renamed onto
the output only if its KLD is lower by more than SIGNIFICANCE paired standard
errors (the lowest such one), else the reference is (copied through a device
or FIFO). The other temporaries are removed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from bpwopt.errors import BpwoptError
from bpwopt.formats.output_paths import OutputPath, writable_output
from bpwopt.jobs.optimize import OptimizeJob, OptimizeReport, optimize_file
from bpwopt.jobs.quantize import QuantizeJob, quantize_file
from bpwopt.quality.evaluate import EvalResult, evaluate
from bpwopt.quality.texts import calibration_text
from bpwopt.quant.types import DEFAULT_ROUNDING
from bpwopt.solve.objective import PROBE_BPW_KEY
from bpwopt.state.store import StateFile, read_identity

DEFAULT_CHUNKS = 4  # windows of the calibration text per candidate
DEFAULT_CTX = 512
CHECK_MODES = ("auto", "on", "off")
SIGNIFICANCE = 2.0  # a candidate is kept only if it beats llama.cpp's preset by this many paired standard errors


@dataclass(frozen=True)
class Candidate:
    label: str  # "bpwopt (…)", the preset's name, or the preset's name and another rounding
    file_bytes: int
    mean_kld: float
    mean_kld_stderr: float
    lead: float  # the reference's mean per-token KLD minus this one's (NaN for the reference itself)
    lead_stderr: float


@dataclass(frozen=True)
class CheckReport:
    plan: OptimizeReport  # the optimizer's own plan (recorded in the state whichever file was kept)
    candidates: tuple[Candidate, ...]  # the plan first, llama.cpp's preset (the reference) last
    chosen: str  # the label of the file now at the output path

    @property
    def difference(self) -> float:
        """Mean per-token KLD of the preset minus the plan's (positive: the plan is better); NaN for a lone plan."""
        return self.candidates[0].lead

    @property
    def difference_stderr(self) -> float:
        return self.candidates[0].lead_stderr


def wants_check(mode: str, job: OptimizeJob) -> bool:
    """Whether to check: `on`; `auto` when the job's state was calibrated (the user has the runtime and the text).

    Never for a dry run or --keep-split shards (nothing whole to compare).
    """
    if mode == "off" or job.dry_run or job.options.keep_split:
        return False
    if mode == "on":
        return True
    if job.state_path is None or not job.state_path.is_file() or importlib.util.find_spec("llama_cpp") is None:
        return False
    with StateFile.open(job.state_path, read_identity(job.state_path), create=False) as state:
        return state.values("sensitivities").get(PROBE_BPW_KEY, 0.0) > 0


def presets_to_try(job: OptimizeJob, plan: OptimizeReport) -> list[str]:
    """The presets the plan was compared with, largest first: the recipe alone when the user gave a TYPE.

    The comparisons hold the two presets at or below the budget and the one above it; fit is decided on the
    written file (the comparison's size leaves out the header).
    """
    names = [c.name for c in sorted(plan.comparisons, key=lambda c: -c.data_bytes)]
    if job.type_text:
        names = [n for n in names if n.upper() == job.type_text.upper()]
    return names


def _fits(job: OptimizeJob, file_bytes: int | None, data_bytes: int, elements: int) -> bool:
    target = job.target
    if target.file_bytes is not None:
        return file_bytes is not None and file_bytes <= target.file_bytes
    return 8.0 * data_bytes / elements <= target.bits_per_weight + 1e-9


def checked_optimize(
    job: OptimizeJob, *, chunks: int = DEFAULT_CHUNKS, ctx: int = DEFAULT_CTX, threads: int | None = None
) -> CheckReport:
    """optimize_file(job); keep the candidate that beats the fitting preset's KLD significantly and most, else it.

    job must write one file (no dry run, no --keep-split). Raises BpwoptError as optimize_file does.
    """
    if job.dry_run or job.options.keep_split:
        raise BpwoptError("the KLD check writes and compares whole files; it cannot run with --dry-run or --keep-split")
    final = job.output_path
    if final is None:
        raise BpwoptError("the KLD check needs an output path")
    target = writable_output(final, [job.input_path, *([job.imatrix_path] if job.imatrix_path else [])])
    # The candidates sit beside the file the output names, so that the kept one is renamed over it;
    # for a device or FIFO they are written to a temporary directory and the kept one copied through.
    scratch = tempfile.TemporaryDirectory(prefix="bpwopt-check-") if target.stream else None
    with scratch or contextlib.nullcontext(target.path.parent) as directory:
        beside = Path(directory)
        plan_path = beside / f".{target.path.name}.bpwopt-plan.gguf"
        preset_path = beside / f".{target.path.name}.bpwopt-preset.gguf"
        rerounded_path = beside / f".{target.path.name}.bpwopt-preset-{job.rounding}.gguf"
        temporaries = (plan_path, rerounded_path, preset_path)
        try:
            plan = optimize_file(replace(job, output_path=plan_path, compare_presets=True))
            candidates = [(f"bpwopt ({plan.target.describe()})", plan_path, plan.file_bytes)]
            candidates += _fitting_preset(job, presets_to_try(job, plan), rerounded_path, preset_path)
            text = calibration_text()
            results: list[EvalResult] = [
                evaluate(job.input_path, path, text, ctx=ctx, chunks=chunks, threads=threads, progress=False)
                for _, path, _ in candidates
            ]
            leads = [paired_lead(results[-1], r) for r in results[:-1]] + [(math.nan, math.nan)]
            significant = [i for i, (lead, se) in enumerate(leads[:-1]) if lead > SIGNIFICANCE * se]
            best = min(significant, key=lambda i: results[i].mean_kld, default=len(results) - 1)
            _publish(candidates[best][1], target)
        finally:
            for path in temporaries:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    kept = tuple(
        Candidate(label, size, r.mean_kld, r.mean_kld_stderr, *lead)
        for (label, _, size), r, lead in zip(candidates, results, leads, strict=True)
    )
    return CheckReport(replace(plan, output_path=final), kept, kept[best].label)


def _fitting_preset(
    job: OptimizeJob, names: list[str], rerounded_path: Path, preset_path: Path
) -> list[tuple[str, Path, int]]:
    """The first of names that fits the budget, as llama.cpp writes it, preceded by it in job's rounding if not ggml's.

    None fits: an empty list (the plan alone is kept).
    """
    for name in names:
        preset = quantize_file(QuantizeJob(job.input_path, preset_path, name, options=job.options,
                                           imatrix_path=job.imatrix_path, progress=False))  # fmt: skip
        if not _fits(job, preset.file_bytes, preset.output_data_bytes, preset.elements):
            continue
        found = [(name, preset_path, preset.file_bytes)]
        if job.rounding != DEFAULT_ROUNDING:
            rerounded = quantize_file(QuantizeJob(job.input_path, rerounded_path, name, options=job.options,
                                                  imatrix_path=job.imatrix_path, rounding=job.rounding,
                                                  progress=False))  # fmt: skip
            if _fits(job, rerounded.file_bytes, rerounded.output_data_bytes, rerounded.elements):
                found.insert(0, (f"{name}, {job.rounding} rounding", rerounded_path, rerounded.file_bytes))
        return found
    return []


def _publish(candidate: Path, target: OutputPath) -> None:
    """The kept candidate onto the output: an atomic rename beside it, or copied through a device or FIFO."""
    if not target.stream:
        candidate.replace(target.path)
        return
    try:
        with candidate.open("rb") as source, open(target.path, "wb") as stream:
            shutil.copyfileobj(source, stream, 1 << 20)
    except OSError as error:
        raise BpwoptError(f"cannot write {target.requested}: {error.strerror or error}") from None


def paired_lead(reference: EvalResult, candidate: EvalResult) -> tuple[float, float]:
    """(mean of reference − candidate KLD per token over the same tokens, its standard error)."""
    paired = reference.kld_per_token - candidate.kld_per_token
    return float(paired.mean()), float(paired.std(ddof=1) / math.sqrt(paired.size))


def format_check(report: CheckReport) -> str:
    """One line per candidate (its lead over llama.cpp's preset) and which one was kept."""
    lines = []
    for c in report.candidates:
        lead = "" if math.isnan(c.lead) else f", preset − this: {c.lead:+.5f} ± {c.lead_stderr:.5f}"
        lines.append(f"KLD check on the calibration text: {c.label}: {c.file_bytes:,} bytes, KLD {c.mean_kld:.5f} ± "
                     f"{c.mean_kld_stderr:.5f}{lead}")  # fmt: skip
    if len(report.candidates) == 1:
        lines.append("no llama.cpp preset fits this budget; kept bpwopt's plan")
    else:
        lines.append(f"kept {report.chosen} (a candidate must lead the preset by {SIGNIFICANCE:g} standard errors)")
    return "\n".join(lines)
