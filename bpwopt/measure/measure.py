"""Measure stage: the squared error every candidate type adds to every tensor the optimizer may vary.

For each tensor the source rows are dequantized once to float32 and every
candidate type is round-tripped through the same kernels the write stage uses,
with the tensor's imatrix exactly as the final quantization will use it. The
fused kernel returns per-row Σ w(x−x̂)² and Σ (x−x̂)², which sum to the tensor's
error. Tensors with more rows than `Sampling.max_rows` are measured on a
stratified, seeded sample of rows, and the standard error of the estimate is
kept beside it. Each (tensor, type) result goes to the caller as soon as it
exists, so the state file can commit it before the next one starts.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from bpwopt.errors import BpwoptError
from bpwopt.formats.imatrix import Imatrix
from bpwopt.formats.splits import ModelFiles
from bpwopt.measure.records import Measurement, TensorRecord
from bpwopt.policy.llama import TensorPlan, fallback_type
from bpwopt.quant import codec
from bpwopt.quant.types import QUANT_TYPES, row_bytes
from bpwopt.source.rows import expert_count, rows_to_float, tensor_rows

Q = GGMLQuantizationType
DEFAULT_CANDIDATES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.IQ4_XS, Q.IQ4_NL, Q.Q4_0, Q.Q5_0, Q.Q5_1)
_ROWS_PER_STRATUM = 2  # two rows per stratum: the fewest that give a variance estimate
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class Sampling:
    """Which rows are measured: every row (precise) or at most max_rows, stratified and seeded."""

    max_rows: int = 1024
    seed: int = 0
    precise: bool = False

    def __post_init__(self) -> None:
        if self.max_rows < 2:  # two rows per stratum at the least, or there is no standard error
            raise BpwoptError("--sample-rows must be at least 2")

    def describe(self) -> str:
        """Canonical text for the state's identity: measurements are reusable only under equal sampling."""
        return "precise" if self.precise else f"rows<={self.max_rows};seed={self.seed}"


@dataclass(frozen=True)
class RowSample:
    """Row indices to measure and the weights that turn their errors into whole-tensor estimates."""

    rows: np.ndarray  # int64 (n,), sorted
    strata: np.ndarray  # int64 (n,), stratum of each row
    stratum_sizes: np.ndarray  # int64 (n_strata,), rows of the tensor in each stratum
    complete: bool  # every row is measured: the estimate is exact


def candidate_types(row_length: int, candidates: Iterable[GGMLQuantizationType]) -> tuple[GGMLQuantizationType, ...]:
    """The types a tensor with this row length can take: llama.cpp's fallbacks applied, smallest first."""
    fitted = {fallback_type(candidate, row_length) for candidate in candidates}
    return tuple(sorted(fitted, key=lambda t: (QUANT_TYPES[t].bits_per_weight, t.name)))


def sample_rows(n_rows: int, sampling: Sampling, tensor_name: str) -> RowSample:
    """Stratified sample: the rows split into equal contiguous strata, two rows drawn from each.

    Contiguous strata spread the sample over the whole tensor (every expert of
    a MoE tensor, every part of an embedding); the seed mixes in the tensor's
    name so that tensors of the same shape do not share row positions.
    """
    if sampling.precise or n_rows <= sampling.max_rows:
        rows = np.arange(n_rows, dtype=np.int64)
        return RowSample(rows, np.zeros(n_rows, np.int64), np.array([n_rows], np.int64), complete=True)
    n_strata = max(1, sampling.max_rows // _ROWS_PER_STRATUM)
    bounds = np.linspace(0, n_rows, n_strata + 1).astype(np.int64)
    rng = np.random.default_rng([sampling.seed, zlib.crc32(tensor_name.encode())])
    picks = [lo + rng.choice(hi - lo, size=_ROWS_PER_STRATUM, replace=False) for lo, hi in pairwise(bounds)]
    rows = np.concatenate(picks)
    strata = np.repeat(np.arange(n_strata, dtype=np.int64), _ROWS_PER_STRATUM)
    order = np.argsort(rows)
    return RowSample(rows[order], strata[order], np.diff(bounds), complete=False)


def estimate_total(per_row: np.ndarray, sample: RowSample) -> tuple[float, float]:
    """Stratified estimate of a per-row quantity's sum over all rows, and its standard error."""
    if sample.complete:
        return float(per_row.sum()), 0.0
    n_strata = sample.stratum_sizes.size
    counts = np.bincount(sample.strata, minlength=n_strata)
    sums = np.bincount(sample.strata, weights=per_row, minlength=n_strata)
    means = sums / counts
    squares = np.bincount(sample.strata, weights=(per_row - means[sample.strata]) ** 2, minlength=n_strata)
    variances = squares / (counts - 1)
    sizes = sample.stratum_sizes.astype(np.float64)
    total = float((sizes * means).sum())
    variance = float((sizes**2 * (1 - counts / sizes) * variances / counts).sum())
    return total, variance**0.5


@dataclass(frozen=True)
class TensorRows:
    """The measured rows of one tensor as float32, with the imatrix weights of each row's expert."""

    name: str
    values: np.ndarray  # float32 (n, n_per_row)
    expert_of_row: np.ndarray  # int64 (n,)
    weights: np.ndarray | None  # float32 (n_expert, n_per_row), or None without an imatrix
    sample: RowSample
    source_type: GGMLQuantizationType


def load_rows(tensor: gguf.ReaderTensor, imatrix: Imatrix | None, sampling: Sampling) -> TensorRows:
    """Dequantize the sampled rows of one tensor; memory is those rows as float32."""
    raw = tensor_rows(tensor)
    n_per_row = int(tensor.shape[0])
    n_expert = expert_count(tensor)
    sample = sample_rows(raw.shape[0], sampling, tensor.name)
    picked = raw if sample.complete else raw[sample.rows]
    source_type = GGMLQuantizationType(tensor.tensor_type)
    values = np.ascontiguousarray(rows_to_float(picked, source_type), dtype=np.float32)
    weights = imatrix.weights_for(tensor.name, n_per_row, n_expert) if imatrix is not None else None
    expert_of_row = sample.rows // (raw.shape[0] // n_expert)
    return TensorRows(tensor.name, values, expert_of_row, weights, sample, source_type)


def energies(rows: TensorRows) -> tuple[float, float]:
    """(Σ w x², Σ x²) of the whole tensor, estimated from the measured rows: the scale of its signal."""
    squares = rows.values.astype(np.float64) ** 2
    plain = squares.sum(axis=1)
    weighted = (squares * rows.weights[rows.expert_of_row]).sum(axis=1) if rows.weights is not None else plain
    return estimate_total(weighted, rows.sample)[0], estimate_total(plain, rows.sample)[0]


def measure_type(rows: TensorRows, qtype: GGMLQuantizationType, total_rows: int) -> Measurement:
    """The error a round trip through qtype adds to this tensor, estimated from the measured rows.

    A candidate equal to the source type costs nothing: the write stage copies
    those bytes unchanged, so the error it adds is exactly zero.
    """
    started = time.perf_counter()
    n_per_row = rows.values.shape[1]
    nbytes = total_rows * row_bytes(qtype, n_per_row)
    n = rows.values.shape[0]
    if qtype == rows.source_type:
        zero = np.zeros(n)
        weighted, plain = zero, zero
    else:
        weighted, plain = np.empty(n), np.empty(n)
        for expert in np.unique(rows.expert_of_row):
            mask = rows.expert_of_row == expert
            values = rows.values if mask.all() else np.ascontiguousarray(rows.values[mask])
            expert_weights = rows.weights[expert] if rows.weights is not None else None
            try:
                weighted[mask], plain[mask] = codec.row_errors(values, qtype, expert_weights)
            except ValueError as error:  # NaN or infinite weights in the file: llama-quantize refuses them too
                raise BpwoptError(f"{rows.name}: cannot quantize to {qtype.name}: {error}") from error
    weighted_sse, weighted_stderr = estimate_total(weighted, rows.sample)
    sse, sse_stderr = estimate_total(plain, rows.sample)
    return Measurement(
        tensor=rows.name,
        qtype=qtype.name,
        nbytes=nbytes,
        weighted_sse=weighted_sse,
        sse=sse,
        weighted_sse_stderr=weighted_stderr,
        sse_stderr=sse_stderr,
        rows_measured=n,
        rows_total=total_rows,
        seconds=time.perf_counter() - started,
    )


def tensor_record(plan: TensorPlan, rows: TensorRows) -> TensorRecord:
    """What the state keeps about a measured tensor (its signal energies make errors relative)."""
    layer = _LAYER.match(plan.source_name)
    weight_energy, plain_energy = energies(rows)
    return TensorRecord(
        name=plan.source_name,
        shape=plan.shape,
        elements=int(np.prod(plan.shape, dtype=np.int64)),
        source_type=plan.source_type.name,
        category=plan.category.value,
        layer=int(layer.group(1)) if layer else None,
        weight_energy=weight_energy,
        plain_energy=plain_energy,
    )


@dataclass(frozen=True)
class MeasureTask:
    """One tensor to measure: its plan entry, its candidate types, and which of them are still missing."""

    plan: TensorPlan
    types: tuple[GGMLQuantizationType, ...]
    missing: tuple[GGMLQuantizationType, ...]
    needs_record: bool


def measure_tensors(
    reader: ModelFiles,
    tasks: Sequence[MeasureTask],
    imatrix: Imatrix | None,
    sampling: Sampling,
    on_record: Callable[[TensorRecord], None],
    on_measurement: Callable[[Measurement], None],
    progress: bool = True,
) -> None:
    """Measure every missing (tensor, type) of tasks, handing each result over as soon as it exists.

    The progress bar counts elements × types, so its ETA weighs big tensors
    and slow types fairly. Peak memory is one tensor's measured rows.
    """
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    pending = [task for task in tasks if task.missing or task.needs_record]
    total = sum(int(by_name[t.plan.source_name].n_elements) * max(1, len(t.missing)) for t in pending)
    with tqdm(total=total, unit="w", unit_scale=True, desc="measuring", disable=not progress or not pending) as bar:
        for task in pending:
            tensor = by_name[task.plan.source_name]
            rows = load_rows(tensor, imatrix, sampling)
            if task.needs_record:
                on_record(tensor_record(task.plan, rows))
            total_rows = int(tensor.n_elements) // int(tensor.shape[0])
            for qtype in task.missing:
                bar.set_postfix_str(f"{task.plan.name} {qtype.name}", refresh=False)
                on_measurement(measure_type(rows, qtype, total_rows))
                bar.update(int(tensor.n_elements))
            if not task.missing:
                bar.update(int(tensor.n_elements))
