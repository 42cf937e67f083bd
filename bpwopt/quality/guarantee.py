"""The guarantee: never hand a user a plan the evidence says is worse than llama.cpp's preset of the same size.

The solver minimizes a prediction of the damage; at the sizes people use a
handful of tensors decides the result, and a prediction can be wrong there
(benchmarks/RESULTS.md). So when measured evidence is at hand — llama.cpp's
runtime and the calibration text, which `bpwopt calibrate` has already used —
the optimizer writes its plan and the largest llama.cpp preset that fits the
same budget, both to temporaries beside the output (beside the file a link
names; in a temporary directory for a device or FIFO), measures each one's KL
divergence against the input model on the calibration text (never the
evaluation text), and renames the plan onto the output only if its KLD is
lower by more than SIGNIFICANCE paired standard errors, else the preset
(copied through a device or FIFO). The other temporary is removed.
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
from bpwopt.solve.objective import PROBE_BPW_KEY
from bpwopt.state.store import StateFile, read_identity

DEFAULT_CHUNKS = 4  # windows of the calibration text per candidate
DEFAULT_CTX = 512
CHECK_MODES = ("auto", "on", "off")
SIGNIFICANCE = 2.0  # the plan is kept only if it beats the preset by this many paired standard errors


@dataclass(frozen=True)
class Candidate:
    label: str  # "bpwopt" or the preset's name
    file_bytes: int
    mean_kld: float
    mean_kld_stderr: float


@dataclass(frozen=True)
class CheckReport:
    plan: OptimizeReport  # the optimizer's own plan (recorded in the state whichever file was kept)
    candidates: tuple[Candidate, ...]
    chosen: str  # the label of the file now at the output path
    difference: float  # mean per-token KLD of the preset minus the plan's (positive: the plan is better)
    difference_stderr: float


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
    """optimize_file(job); keep its plan if it beats the fitting preset's measured KLD significantly, else the preset.

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
        try:
            plan = optimize_file(replace(job, output_path=plan_path, compare_presets=True))
            candidates = [(f"bpwopt ({plan.target.describe()})", plan_path, plan.file_bytes)]
            for name in presets_to_try(job, plan):
                preset = quantize_file(QuantizeJob(job.input_path, preset_path, name, options=job.options,
                                                   imatrix_path=job.imatrix_path, progress=False))  # fmt: skip
                if _fits(job, preset.file_bytes, preset.output_data_bytes, preset.elements):
                    candidates.append((name, preset_path, preset.file_bytes))
                    break
            text = calibration_text()
            results: list[EvalResult] = [
                evaluate(job.input_path, path, text, ctx=ctx, chunks=chunks, threads=threads, progress=False)
                for _, path, _ in candidates
            ]
            difference, stderr = paired_difference(results)
            best = 1 if len(results) == 2 and not difference > SIGNIFICANCE * stderr else 0
            _publish(candidates[best][1], target)
        finally:
            for path in (plan_path, preset_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    kept = tuple(
        Candidate(label, size, r.mean_kld, r.mean_kld_stderr)
        for (label, _, size), r in zip(candidates, results, strict=True)
    )
    return CheckReport(replace(plan, output_path=final), kept, kept[best].label, difference, stderr)


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


def paired_difference(results: list[EvalResult]) -> tuple[float, float]:
    """(mean of preset − plan KLD per token, its standard error); NaN for a lone plan."""
    if len(results) < 2:
        return math.nan, math.nan
    paired = results[1].kld_per_token - results[0].kld_per_token
    return float(paired.mean()), float(paired.std(ddof=1) / math.sqrt(paired.size))


def format_check(report: CheckReport) -> str:
    """One line per candidate and which one was kept."""
    lines = [
        f"KLD check on the calibration text: {c.label}: {c.file_bytes:,} bytes, KLD {c.mean_kld:.5f} ± "
        f"{c.mean_kld_stderr:.5f}" for c in report.candidates
    ]  # fmt: skip
    if len(report.candidates) == 1:
        lines.append("no llama.cpp preset fits this budget; kept bpwopt's plan")
    else:
        lines.append(f"kept {report.chosen} (preset − plan: {report.difference:+.5f} ± {report.difference_stderr:.5f}; "
                     f"the plan must lead by {SIGNIFICANCE:g} standard errors)")
    return "\n".join(lines)
