"""The optimizer job: measure every candidate, solve for the budget, write — `bpwopt IN --target-size …`.

llama.cpp's policy (`bpwopt.policy.llama`) still decides which tensors may change
at all and which types the user pinned; every other quantizable tensor gets
the candidate types that fit its row length, is measured (`bpwopt.measure.measure`)
into the state file (`bpwopt.state.store`), and the solver (`bpwopt.solve.solver`) picks
one type per tensor under the budget (`bpwopt.solve.targets`). The output goes
through the same write stage as the llama-quantize job. `optimize_file` reads
as those stages: `_apply_policy`, `_measure`, `build_problem`,
`_solve_for_target`, `_write`, `_record_plan`.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, ReaderTensor

from bpwopt.errors import BpwoptError
from bpwopt.formats.gguf_writer import padded_size
from bpwopt.formats.splits import model_sha256
from bpwopt.jobs.quantize import (
    SourceModel,
    check_outputs,
    default_output_path,
    open_source,
    output_base,
    tensor_output_bytes,
    write_request,
)
from bpwopt.measure.executors import RayExecutor
from bpwopt.measure.measure import (
    DEFAULT_CANDIDATES,
    Sampling,
    TensorResult,
    TensorTask,
    candidate_types,
    measure_tensors,
)
from bpwopt.measure.records import STATISTICS
from bpwopt.policy.llama import (
    QuantizeOptions,
    TensorPlan,
    TypePlan,
    check_plan_writable,
    is_quantized,
    plan_types,
    preset_plans,
)
from bpwopt.policy.presets import PRESETS, Preset, parse_type_argument
from bpwopt.quant.types import DEFAULT_ROUNDING, QUANT_TYPES
from bpwopt.solve.objective import default_objective, tensor_weights
from bpwopt.solve.problem import Problem, useful_range
from bpwopt.solve.problem import build_problem as assemble_problem
from bpwopt.solve.solver import Solution, solve
from bpwopt.solve.targets import Target
from bpwopt.source.rows import expert_count
from bpwopt.state.store import PlanRecord, StateFile, StateIdentity, default_state_path
from bpwopt.write.model_writer import KeyValue, WriteRequest, planned_file_bytes, tensor_alignments, write_model

_BPW_TOLERANCE = 0.01  # a bpw target lands at most this far below; so the top of the range may be that close
_DEFAULT_RECIPE = "Q8_0"  # without a TYPE, the policy runs with a preset that pins nothing
_BASE_FTYPE_BY_TYPE = {p.base_type: int(p.ftype) for p in reversed(PRESETS) if not p.only_copy}


@dataclass
class OptimizeJob:
    """One `bpwopt IN [OUT] [TYPE] --target-…` invocation, as plain data."""

    input_path: Path
    output_path: Path | None
    target: Target
    type_text: str | None = None  # the preset the plan is compared with
    options: QuantizeOptions = field(default_factory=QuantizeOptions)
    imatrix_path: Path | None = None
    overrides: dict[str, KeyValue] = field(default_factory=dict)
    rounding: str = DEFAULT_ROUNDING  # --rounding: the quantizers measured and written (part of the state's identity)
    candidates: tuple[GGMLQuantizationType, ...] = DEFAULT_CANDIDATES
    sampling: Sampling = field(default_factory=Sampling)
    ray_address: str | None = None  # --ray: measure on this Ray cluster ("auto" or host:port); None: in this process
    state_path: Path | None = None  # --state-file
    save_state: bool = False  # --save-state: state/<model>-<hash>-mse.bpw_state unless state_path
    objective: str | None = None  # None: bpwopt.solve.objective.default_objective of the state's weights
    ignore_importance: bool = False  # --ignore-tensor-importance: no stored per-group weights or tuned factors
    tuning: dict[str, float] | None = None  # class and depth factors (bpwopt.quality.tune's trials); None: the state's
    record_plan: bool = True  # store the plan in the state (a tuning trial's plans are not kept)
    measure_missing: bool = True  # False: a pair the state lacks is an error (a plan from the state alone)
    compare_presets: bool = False  # solve again at the nearest presets' sizes, for the report (the CLI's)
    time_limit: float = 10.0  # seconds for the exact (MILP) stage
    dry_run: bool = False
    progress: bool = True


@dataclass(frozen=True)
class ChosenTensor:
    """One tensor of the plan: its type, its bytes in the file, and the error the objective predicts."""

    name: str
    category: str
    qtype: str
    data_bytes: int
    elements: int
    error: float  # objective units; 0 for tensors the optimizer does not vary
    varied: bool


@dataclass(frozen=True)
class PresetComparison:
    """A llama.cpp preset next to bpwopt's plan for the same budget."""

    name: str
    data_bytes: int
    bits_per_weight: float
    predicted_error: float  # the preset's types under the same objective
    optimized_error: float  # bpwopt's plan at the preset's size


@dataclass(frozen=True)
class OptimizeReport:
    output_path: Path | None
    target: Target
    tensors: tuple[ChosenTensor, ...]
    elements: int
    data_bytes: int  # tensor data, as llama.cpp's size line counts it
    file_bytes: int  # the whole file (all shards), predicted before writing and equal to what was written
    objective: str  # what was minimized (the job's, or the state's default)
    predicted_error: float
    gap: float  # the solver's remaining relative optimality gap
    solve_seconds: float
    measured: int  # (tensor, type) pairs measured by this run
    reused: int  # pairs found in the state file
    dominated: int  # measured pairs whose sample stopped growing because a smaller type clearly errs less
    measure_seconds: float  # wall time of the measure stage
    write_seconds: float  # wall time of the write stage
    reachable_bytes: tuple[int, int]  # smallest plan and least-error plan, in the target's units (no header)
    comparisons: tuple[PresetComparison, ...]
    state_path: Path | None
    written: bool
    shards: int  # files written: 1, the --keep-split shards (output_path is the first), or 0 for a dry run

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.data_bytes / self.elements


@dataclass(frozen=True)
class PolicyPlan:
    """What llama.cpp's policy makes of the model: its base plan, the tensors bpwopt varies and their types."""

    source: SourceModel
    recipe: Preset
    base: TypePlan
    varied: tuple[TensorPlan, ...]
    types_of: dict[str, tuple[GGMLQuantizationType, ...]]  # source name -> candidate types that fit it


def optimize_file(job: OptimizeJob) -> OptimizeReport:
    """Measure what is missing, solve for job.target, and (unless a dry run) write the plan."""
    policy = _apply_policy(job)
    output_path = job.output_path or default_output_path(job.input_path, job.target.file_label())
    output_path = output_base(output_path, policy.source.options)
    if not job.dry_run:
        check_outputs(policy.source, output_path)  # before measuring: its size is checked once the plan is known
    identity = _identity(policy.source, job)
    with _open_state(job, identity) as state:
        started = time.perf_counter()
        measured, reused, dominated = _measure(policy, state, job)
        measure_seconds = time.perf_counter() - started
        job, problem, template = build_problem(policy, state, job)
        solution, reachable, budget = _solve_for_target(policy, problem, template, job)
        types = problem.types(solution.choice)
        request = write_request(policy.source, types, _file_type(policy.base, types, job), job.overrides,
                                _provenance(job, identity, solution), job.progress, job.rounding)  # fmt: skip
        file_bytes = planned_file_bytes(request)
        if job.target.file_bytes is not None and file_bytes > job.target.file_bytes:
            raise BpwoptError(f"internal error: plan of {file_bytes} bytes exceeds the target {job.target.file_bytes}")
        check_plan_writable(_final_plan(policy.base, types), policy.source.options)
        tensors = _chosen_tensors(problem, solution.choice, policy.source)
        data_bytes = sum(t.data_bytes for t in tensors)
        comparisons = _comparisons(policy, problem, job, budget) if job.compare_presets else ()
        started = time.perf_counter()
        written_paths = _write(policy.source, request, output_path, file_bytes) if not job.dry_run else []
        write_seconds = time.perf_counter() - started
        if (job.save_state or job.state_path) and job.record_plan:
            _record_plan(state, job, types, solution, data_bytes, file_bytes, problem.elements)
        state_path = state.path if (job.save_state or job.state_path) else None
    return OptimizeReport(
        output_path=written_paths[0] if written_paths else None,
        target=job.target,
        tensors=tensors,
        elements=problem.elements,
        data_bytes=data_bytes,
        file_bytes=file_bytes,
        objective=job.objective,
        predicted_error=solution.total_error,
        gap=solution.gap,
        solve_seconds=solution.seconds,
        measured=measured,
        reused=reused,
        dominated=dominated,
        measure_seconds=measure_seconds,
        write_seconds=write_seconds,
        reachable_bytes=reachable,
        comparisons=comparisons,
        state_path=state_path,
        written=not job.dry_run,
        shards=len(written_paths),
    )


def _apply_policy(job: OptimizeJob) -> PolicyPlan:
    """Open the model, run llama.cpp's policy, and give each tensor bpwopt may change its candidate types."""
    if job.options.prune_layers:
        raise BpwoptError("--prune-layers together with --target-bpw/--target-size is not supported yet")
    source = open_source(job.input_path, job.imatrix_path, job.options)
    if source.model.architecture == "clip":
        raise BpwoptError("--target-bpw/--target-size do not take CLIP / mmproj files yet; give a TYPE instead")
    recipe = parse_type_argument(job.type_text or _DEFAULT_RECIPE, is_clip=False)
    base = plan_types(source.specs, source.model, recipe.preset, source.options, check_writable=False)
    varied = tuple(t for t in base.tensors if t.quantizable and not t.pinned)
    _refuse_requantize(varied, source.options)
    types_of = {t.source_name: _quantizable_types(source, t.source_name, job.candidates) for t in varied}
    if job.type_text:
        types_of = _with_recipe_types(types_of, varied)
    return PolicyPlan(source, recipe.preset, base, varied, types_of)


def _quantizable_types(
    source: SourceModel, name: str, candidates: tuple[GGMLQuantizationType, ...]
) -> tuple[GGMLQuantizationType, ...]:
    """A tensor's candidate types, less those ggml quantizes only with imatrix weights when it has none."""
    tensor = source.tensors_by_name[name]
    weighted = source.imatrix is not None and (
        source.imatrix.weights_for(name, int(tensor.shape[0]), expert_count(tensor)) is not None
    )
    fitted = candidate_types(tensor.shape[0], candidates)
    types = tuple(t for t in fitted if weighted or not QUANT_TYPES[t].requires_imatrix)
    if not types:
        given = ", ".join(t.name for t in candidates)
        if fitted:
            raise BpwoptError(f"none of the candidate types ({given}) can be quantized without an importance matrix "
                              f"for {name}; give --imatrix or other --candidates")  # fmt: skip
        raise BpwoptError(f"none of the candidate types ({given}) fits the {tensor.shape[0]}-wide rows of {name}; "
                          "give other --candidates")  # fmt: skip
    return types


def build_problem(policy: PolicyPlan, state: StateFile, job: OptimizeJob) -> tuple[OptimizeJob, Problem, WriteRequest]:
    """The solver's problem from the state's measurements, with the job's objective settled.

    Returns the job with its objective filled in (the state's default when none was asked for), the
    problem, and the base plan's write request (its alignments price each tensor; its header is the
    size a target must leave for metadata).
    """
    group_weights = {} if job.ignore_importance else state.values("weights")  # calibrated sensitivities
    job = replace(job, objective=job.objective or default_objective(group_weights, state.values("sensitivities")))
    template = write_request(
        policy.source, policy.base.types(), 0, job.overrides, _provenance_template(job), rounding=job.rounding
    )
    alignment_of = tensor_alignments(template)
    by_name = policy.source.tensors_by_name
    records = state.tensors()
    tuning = {} if job.ignore_importance else job.tuning if job.tuning is not None else state.values("tuned")
    varied_names = {t.name for t in policy.varied}
    fixed_cost = sum(
        _cost(job, tensor_output_bytes(by_name[t.source_name], t.target_type), alignment_of[t.name])
        for t in policy.base.tensors
        if t.name not in varied_names
    )
    problem = assemble_problem(
        policy.base,
        policy.varied,
        policy.types_of,
        state.measurements(),
        records,
        job.objective,
        tensor_weights(records, group_weights, tuning),
        lambda tensor, nbytes: _cost(job, nbytes, alignment_of[tensor.name]),
        fixed_cost,
        sum(int(by_name[t.source_name].n_elements) for t in policy.base.tensors),
    )
    return job, problem, template


def _solve_for_target(
    policy: PolicyPlan, problem: Problem, template: WriteRequest, job: OptimizeJob
) -> tuple[Solution, tuple[int, int], int]:
    """The solver's plan for the target, the reachable range (smallest, least-error) and the budget, in its units."""
    reachable = tuple(c + problem.fixed_cost for c in useful_range(problem.options))
    header = _header_bytes(policy.source, policy.base, template) if job.target.counts_whole_file else 0
    budget = _budget(job.target, problem, header, reachable)
    return solve(problem.options, budget, time_limit=job.time_limit), reachable, budget


def _write(source: SourceModel, request: WriteRequest, output_path: Path, file_bytes: int) -> list[Path]:
    """Write the plan; returns the files written (one, or the --keep-split shards)."""
    written_paths = check_outputs(source, output_path, file_bytes)
    written = write_model(request, output_path)
    if written != file_bytes:
        raise BpwoptError(f"internal error: wrote {written} bytes, predicted {file_bytes}")
    return written_paths


def _record_plan(
    state: StateFile,
    job: OptimizeJob,
    types: dict[str, GGMLQuantizationType],
    solution: Solution,
    data_bytes: int,
    file_bytes: int,
    elements: int,
) -> None:
    if state.read_only:  # a plan is a record of the run, not something a later run needs
        return
    state.add_plan(
        PlanRecord(
            target=job.target.describe(),
            objective=job.objective,
            types={name: t.name for name, t in types.items()},
            predicted_error=solution.total_error,
            total_bytes=data_bytes,
            file_bytes=file_bytes,
            bits_per_weight=8.0 * data_bytes / elements,
            gap=solution.gap,
        )
    )


def _refuse_requantize(varied: Sequence[TensorPlan], options: QuantizeOptions) -> None:
    """llama-quantize refuses to requantize without --allow-requantize; so do we, before measuring."""
    if options.allow_requantize:
        return
    quantized = next((t for t in varied if is_quantized(t.source_type)), None)
    if quantized is not None:
        raise BpwoptError(
            f"requantizing from type {quantized.source_type.name} is disabled (tensor {quantized.source_name}); "
            "pass --allow-requantize"
        )


def _with_recipe_types(types_of: dict[str, tuple], varied: Sequence[TensorPlan]) -> dict[str, tuple]:
    """Add the recipe's own type of each tensor, so the plan can be compared with (and fall back to) it."""
    return {t.source_name: tuple(dict.fromkeys((*types_of[t.source_name], t.target_type))) for t in varied}


def _identity(source: SourceModel, job: OptimizeJob) -> StateIdentity:
    name_field = source.reader.fields.get("general.name")
    model_name = str(name_field.contents()) if name_field is not None else source.path.stem
    return StateIdentity(
        model_sha256=model_sha256(source.reader),
        model_name=model_name,
        imatrix_sha256=source.imatrix.sha256 if source.imatrix is not None else None,
        candidates=tuple(t.name for t in job.candidates),
        sampling=job.sampling.describe(),
        rounding=job.rounding,
    )


@contextmanager
def _open_state(job: OptimizeJob, identity: StateIdentity) -> Iterator[StateFile]:
    """The state file the user asked for, or a throwaway one: one code path either way."""
    if job.state_path is not None or job.save_state:
        path = job.state_path or default_state_path(identity.model_name, identity.model_sha256)
        with StateFile.open(path, identity) as state:
            yield state
        return
    with (
        tempfile.TemporaryDirectory(prefix="bpwopt-") as directory,
        StateFile.open(Path(directory) / "run.bpw_state", identity) as state,
    ):
        yield state


def _measure(policy: PolicyPlan, state: StateFile, job: OptimizeJob) -> tuple[int, int, int]:
    """Measure the (tensor, type) pairs the state lacks; returns (measured now, reused, of them dominated).

    A stored pair lacking a statistic this bpwopt computes (a state from before it existed) is measured again.
    Tasks are made as the executor takes them, so only the tensor in flight holds its imatrix weights.
    """
    known = {key for key, m in state.measurements().items() if STATISTICS.keys() <= m.statistics.keys()}
    records = state.tensors()
    by_name = policy.source.tensors_by_name
    pending = []  # (plan, missing type names, needs a record)
    for plan in policy.varied:
        missing = tuple(t.name for t in policy.types_of[plan.source_name] if (plan.source_name, t.name) not in known)
        if missing or plan.source_name not in records:
            pending.append((plan, missing, plan.source_name not in records))

    def tasks() -> Iterator[TensorTask]:
        for plan, missing, needs_record in pending:
            tensor = by_name[plan.source_name]
            weights = None
            if policy.source.imatrix is not None:
                weights = policy.source.imatrix.weights_for(tensor.name, int(tensor.shape[0]), expert_count(tensor))
            yield TensorTask(
                model_path=str(policy.source.reader.paths[0]),
                tensor=plan.source_name,
                category=plan.category.value,
                types=missing,
                weights=weights,
                sampling=job.sampling,
                needs_record=needs_record,
                work=_measuring_work(tensor, len(missing), job.sampling),
                rounding=job.rounding,
            )

    measured = sum(len(missing) for _, missing, _ in pending)
    if pending and (state.read_only or not job.measure_missing):
        plan, missing, _ = pending[0]
        lacks = f"lacks {max(measured, 1)} measurement(s) this run needs"
        first = f"(first: {plan.source_name}{' as ' + missing[0] if missing else ''})"
        if state.read_only:
            raise BpwoptError(f"state file {state.path} is read-only and {lacks} {first}; "
                              "give a --state-file that can be written")  # fmt: skip
        raise BpwoptError(f"state file {state.path} {lacks} {first}; measure the model first")
    reused = sum(len(policy.types_of[plan.source_name]) for plan in policy.varied) - measured
    total = sum(_measuring_work(by_name[plan.source_name], len(missing), job.sampling) for plan, missing, _ in pending)
    executor = RayExecutor(job.ray_address) if job.ray_address else None
    dominated = []
    measure_tensors(tasks(), lambda result: _store(state, result, dominated), executor, job.progress, total)
    return measured, reused, len(dominated)


def _measuring_work(tensor: ReaderTensor, types: int, sampling: Sampling) -> int:
    """Weights quantized at most to measure types on tensor: a sampled tensor costs its sample, not its size."""
    n_per_row = int(tensor.shape[0])
    return n_per_row * sampling.most_rows(int(tensor.n_elements) // n_per_row) * max(1, types)


def _store(state: StateFile, result: TensorResult, dominated: list[str]) -> None:
    dominated += result.dominated
    if result.record is not None:
        state.add_tensors([result.record])
    for measurement in result.measurements:
        state.add_measurement(measurement)


def _cost(job: OptimizeJob, data_bytes: int, alignment: int) -> int:
    """An option's bytes in the target's units: padded in the file for size targets, raw for bpw."""
    return padded_size(data_bytes, alignment) if job.target.counts_whole_file else data_bytes


def _header_bytes(source: SourceModel, base: TypePlan, template: WriteRequest) -> int:
    """Header and metadata bytes of every file: their size minus the padded tensor data (independent of the types).

    template: the write request of the base plan, with provenance keys of their final encoded size.
    """
    alignment_of, by_name = tensor_alignments(template), source.tensors_by_name
    data = sum(
        padded_size(tensor_output_bytes(by_name[t.source_name], t.target_type), alignment_of[t.name])
        for t in base.tensors
    )
    return planned_file_bytes(template) - data


def _budget(target: Target, problem: Problem, header: int, reachable: tuple[int, int]) -> int:
    """Bytes the solver may spend on the varied tensors; a target out of range names the reachable range."""
    if target.file_bytes is not None:
        low, high = reachable[0] + header, reachable[1] + header
        if not low <= target.file_bytes <= high:
            where = "below the smallest" if target.file_bytes < low else "above the least-error"
            raise BpwoptError(
                f"--target-size {target.file_bytes:,} bytes is {where} plan's file "
                f"(reachable: {low:,} to {high:,} bytes)"
            )
        return target.file_bytes - header - problem.fixed_cost
    budget = target.data_budget(problem.elements)
    if not reachable[0] <= budget <= reachable[1] + problem.elements / 8 * _BPW_TOLERANCE:
        # printed so that any value inside the printed range is reachable
        low = math.ceil(8e4 * reachable[0] / problem.elements) / 1e4
        high = math.floor(8e4 * reachable[1] / problem.elements) / 1e4
        where = "below the smallest" if budget < reachable[0] else "above the least-error"
        raise BpwoptError(
            f"--target-bpw {target.bits_per_weight:g} is {where} plan's bpw (reachable: {low:.4f} to {high:.4f} bpw)"
        )
    return min(budget, reachable[1]) - problem.fixed_cost


def _provenance_template(job: OptimizeJob, predicted_error: float = 0.0, gap: float = 0.0, state: str = "0" * 64):
    """bpwopt.* keys; every value has a fixed encoded size, so the header is known before solving."""
    return {
        "bpwopt.target": (GGUFValueType.STRING, job.target.describe()),
        "bpwopt.objective": (GGUFValueType.STRING, job.objective),
        "bpwopt.predicted_error": (GGUFValueType.FLOAT64, predicted_error),
        "bpwopt.optimality_gap": (GGUFValueType.FLOAT64, gap),
        "bpwopt.state": (GGUFValueType.STRING, state),
        "bpwopt.recipe": (GGUFValueType.STRING, job.type_text.upper() if job.type_text else "none"),
    }


def _provenance(job: OptimizeJob, identity: StateIdentity, solution) -> dict[str, KeyValue]:
    state_hash = hashlib.sha256(repr(identity).encode()).hexdigest()
    return _provenance_template(job, solution.total_error, solution.gap, state_hash)


def _file_type(base: TypePlan, types: dict[str, GGMLQuantizationType], job: OptimizeJob) -> int:
    """general.file_type: the recipe's ftype when given, else the pure preset of the type holding most weights."""
    if job.type_text and base.file_type is not None:
        return base.file_type
    counts: dict[GGMLQuantizationType, int] = {}
    for tensor in base.tensors:
        ggml_type = types[tensor.name]
        counts[ggml_type] = counts.get(ggml_type, 0) + int(np.prod(tensor.shape, dtype=np.int64))
    dominant = max(counts, key=lambda t: (counts[t], t.name))
    return _BASE_FTYPE_BY_TYPE.get(dominant, 0)


def _final_plan(base: TypePlan, types: dict[str, GGMLQuantizationType]) -> TypePlan:
    tensors = tuple(
        t if types[t.name] == t.target_type else replace(t, target_type=types[t.name], requires_imatrix=False)
        for t in base.tensors
    )
    return replace(base, tensors=tensors)


def _chosen_tensors(problem: Problem, choice: np.ndarray, source: SourceModel) -> tuple[ChosenTensor, ...]:
    types = problem.types(choice)
    errors = {opts.name: float(opts.error[index]) for opts, index in zip(problem.options, choice, strict=True)}
    by_name = source.tensors_by_name
    return tuple(
        ChosenTensor(
            name=t.name,
            category=t.category.value,
            qtype=types[t.name].name,
            data_bytes=tensor_output_bytes(by_name[t.source_name], types[t.name]),
            elements=int(by_name[t.source_name].n_elements),
            error=errors.get(t.name, 0.0),
            varied=t.name in errors,
        )
        for t in problem.base.tensors
    )


def _comparisons(policy: PolicyPlan, problem: Problem, job: OptimizeJob, budget: int) -> tuple[PresetComparison, ...]:
    """The recipe (with a TYPE) or the presets nearest the budget, each against bpwopt at its size.

    Nearest the budget, not the plan's size: a plan can land well under its
    budget (Gemma-3-270M's plans stop 21 MB short of a Q5_K_M-sized budget
    when the only upgrade left is the 168M-weight embedding's next type), and
    the preset a user would otherwise take is the largest that fits the budget.

    Only presets whose types were all measured can be compared; the default
    candidates cover every K-quant and legacy preset bpwopt can write. Each
    comparison is one more solve, so only the CLI's report asks for them.
    """
    source = policy.source
    choices = {}
    first_of_ftype = {}  # aliases (Q4_K for Q4_K_M) are the same recipe
    for preset in PRESETS:
        if not preset.only_copy and (not job.type_text or preset == policy.recipe):
            first_of_ftype.setdefault(preset.ftype, preset)
    for preset, preset_plan in preset_plans(source.specs, source.model, first_of_ftype.values(), source.options):
        choice = problem.choice_of(preset_plan.types())
        if choice is not None:
            choices[preset.name] = choice
    smaller = [name for name, choice in choices.items() if problem.cost(choice) <= budget]
    larger = [name for name in choices if name not in smaller]
    nearest = sorted(smaller, key=lambda n: -problem.cost(choices[n]))[:2]
    nearest += sorted(larger, key=lambda n: problem.cost(choices[n]))[:1]
    comparisons = []
    for name in sorted(nearest, key=lambda n: problem.cost(choices[n])):
        choice = choices[name]
        optimized = solve(problem.options, problem.cost(choice), time_limit=job.time_limit)
        types = problem.types(choice)
        data = sum(
            tensor_output_bytes(source.tensors_by_name[t.source_name], types[t.name]) for t in problem.base.tensors
        )
        error = float(sum(opts.error[i] for opts, i in zip(problem.options, choice, strict=True)))
        comparisons.append(PresetComparison(name, data, 8.0 * data / problem.elements, error, optimized.total_error))
    return tuple(comparisons)
