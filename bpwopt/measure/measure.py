"""Measure stage: the squared error every candidate type adds to every tensor the optimizer may vary.

For each tensor the source rows are dequantized once to float32 and every
candidate type is round-tripped through the same kernels the write stage uses,
with the tensor's imatrix exactly as the final quantization will use it. The
fused kernel returns per-row Σ w(x−x̂)² and Σ (x−x̂)², which sum to the tensor's
error. Tensors with more rows than `Sampling.max_rows` are measured on a
stratified, seeded sample of rows, and the standard error of the estimate is
kept beside it. One tensor is one task (`measure_tensor`, picklable in and
out), run by an executor (`bpwopt.measure.executors`) with an error backend
(`bpwopt.measure.backends`); each tensor's result goes to the caller as soon
as it exists, so the state file commits it before the next one is handed over.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from bpwopt.errors import BpwoptError
from bpwopt.formats.splits import open_model
from bpwopt.measure.backends import BACKENDS, DEFAULT_BACKEND, ErrorBackend
from bpwopt.measure.executors import Executor, InProcessExecutor
from bpwopt.measure.records import Estimate, Measurement, TensorRecord
from bpwopt.policy.llama import fallback_type
from bpwopt.quant.types import DEFAULT_ROUNDING, QUANT_TYPES, row_bytes
from bpwopt.source.rows import expert_count, release_pages, rows_to_float, tensor_rows

Q = GGMLQuantizationType
# Every type that sits on some tensor's error/size front of SmolLM2 or Gemma-3-270M, with or without an imatrix
# (benchmarks/pareto.py; RESULTS.md "Every type"), plus Q4_0 for llama.cpp's fallbacks and preset comparisons.
# TQ1_0 and TQ2_0 never did. Q2_0 is on the front of SmolLM2's 576-wide tensors (the smallest type they fit)
# and of 31 of Gemma's 127 with an imatrix; it changes no SmolLM2 plan at the presets' sizes, and lets plans go
# smaller (the demo model: 2.04 bpw instead of 3.64).
# Types that need an imatrix are measured only for tensors it covers.
DEFAULT_CANDIDATES = (
    Q.Q1_0, Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.Q2_0, Q.IQ2_XS, Q.IQ2_S, Q.Q2_K, Q.IQ3_XXS, Q.IQ3_S, Q.Q3_K, Q.IQ4_XS,
    Q.MXFP4, Q.IQ4_NL, Q.Q4_0, Q.Q4_K, Q.Q4_1, Q.Q5_0, Q.Q5_K, Q.Q5_1, Q.Q6_K, Q.Q8_0,
)  # fmt: skip
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
    """The types a tensor with this row length can take: llama.cpp's fallbacks applied, smallest first.

    A candidate llama.cpp has no fallback for (Q1_0 on rows that are not a multiple of 128) is left out.
    """
    fitted = set()
    for candidate in candidates:
        with contextlib.suppress(BpwoptError):
            fitted.add(fallback_type(candidate, row_length))
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


def load_rows(tensor: gguf.ReaderTensor, weights: np.ndarray | None, sampling: Sampling) -> TensorRows:
    """Dequantize the sampled rows of one tensor; memory is those rows as float32.

    weights: the tensor's imatrix weights, float32 (n_expert, n_per_row) (`Imatrix.weights_for`), or None.
    """
    raw = tensor_rows(tensor)
    n_expert = expert_count(tensor)
    sample = sample_rows(raw.shape[0], sampling, tensor.name)
    picked = raw if sample.complete else raw[sample.rows]
    source_type = GGMLQuantizationType(tensor.tensor_type)
    values = np.ascontiguousarray(rows_to_float(picked, source_type, tensor.name), dtype=np.float32)
    release_pages(tensor)  # a view of F32 rows faults its pages back in if read again
    expert_of_row = sample.rows // (raw.shape[0] // n_expert)
    return TensorRows(tensor.name, values, expert_of_row, weights, sample, source_type)


def energies(rows: TensorRows) -> tuple[float, float]:
    """(Σ w x², Σ x²) of the whole tensor, estimated from the measured rows: the scale of its signal."""
    squares = rows.values.astype(np.float64) ** 2
    plain = squares.sum(axis=1)
    weighted = (squares * rows.weights[rows.expert_of_row]).sum(axis=1) if rows.weights is not None else plain
    return estimate_total(weighted, rows.sample)[0], estimate_total(plain, rows.sample)[0]


def measure_type(
    rows: TensorRows,
    qtype: GGMLQuantizationType,
    total_rows: int,
    backend: ErrorBackend = BACKENDS[DEFAULT_BACKEND],
    rounding: str = DEFAULT_ROUNDING,
) -> Measurement:
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
                weighted[mask], plain[mask] = backend.row_errors(values, qtype, expert_weights, rounding)
            except ValueError as error:  # NaN or infinite weights in the file: llama-quantize refuses them too
                raise BpwoptError(f"{rows.name}: cannot quantize to {qtype.name}: {error}") from error
    return Measurement(
        tensor=rows.name,
        qtype=qtype.name,
        nbytes=nbytes,
        statistics={
            "weighted_sse": Estimate(*estimate_total(weighted, rows.sample)),
            "sse": Estimate(*estimate_total(plain, rows.sample)),
        },
        rows_measured=n,
        rows_total=total_rows,
        seconds=time.perf_counter() - started,
    )


def tensor_record(tensor: gguf.ReaderTensor, category: str, rows: TensorRows) -> TensorRecord:
    """What the state keeps about a measured tensor (its signal energies make errors relative)."""
    layer = _LAYER.match(tensor.name)
    weight_energy, plain_energy = energies(rows)
    return TensorRecord(
        name=tensor.name,
        shape=tuple(int(n) for n in tensor.shape),
        elements=int(tensor.n_elements),
        source_type=rows.source_type.name,
        category=category,
        layer=int(layer.group(1)) if layer else None,
        weight_energy=weight_energy,
        plain_energy=plain_energy,
    )


@dataclass(frozen=True)
class TensorTask:
    """One tensor to measure, as plain picklable data: a worker needs only the model's files besides it."""

    model_path: str  # the model's (first) file; its shards are found beside it
    tensor: str  # the tensor's name in the file
    category: str  # its class, as llama.cpp's policy names it (for the record)
    types: tuple[str, ...]  # type names to measure, smallest first
    weights: np.ndarray | None  # its imatrix weights, float32 (n_expert, n_per_row); None without an imatrix
    sampling: Sampling
    needs_record: bool  # the state has no TensorRecord of it yet
    elements: int  # its number of weights, so a driver can weigh progress
    backend: str = DEFAULT_BACKEND  # a name in BACKENDS
    rounding: str = DEFAULT_ROUNDING  # the quantizers measured: a name in bpwopt.quant.types.ROUNDINGS


@dataclass(frozen=True)
class TensorResult:
    """What measuring one tensor gives: its record (if asked for) and a measurement per type of the task."""

    tensor: str
    record: TensorRecord | None
    measurements: tuple[Measurement, ...]


def measure_tensor(task: TensorTask) -> TensorResult:
    """Measure every type of task on one tensor; peak memory is its measured rows as float32."""
    tensor = _tensors_of(*_file_key(task.model_path)).get(task.tensor)
    if tensor is None:
        raise BpwoptError(f"{task.model_path} has no tensor {task.tensor}")
    rows = load_rows(tensor, task.weights, task.sampling)
    record = tensor_record(tensor, task.category, rows) if task.needs_record else None
    total_rows = int(tensor.n_elements) // int(tensor.shape[0])
    backend = BACKENDS[task.backend]
    measured = tuple(
        measure_type(rows, GGMLQuantizationType[name], total_rows, backend, task.rounding) for name in task.types
    )
    return TensorResult(task.tensor, record, measured)


def _file_key(path: str) -> tuple[str, int, int, int]:
    """A model file's path with its inode, size and mtime: a file replaced at the same path is opened afresh."""
    stat = os.stat(path)
    return path, stat.st_ino, stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _tensors_of(path: str, inode: int, size: int, mtime_ns: int) -> dict[str, gguf.ReaderTensor]:
    """The model's tensors by name, memory-mapped once per process and file rather than once per task."""
    return {tensor.name: tensor for tensor in open_model(path).tensors}


def measure_tensors(
    tasks: Iterable[TensorTask],
    on_result: Callable[[TensorResult], None],
    executor: Executor | None = None,
    progress: bool = True,
    total: int | None = None,
) -> None:
    """Run every task on executor (in this process by default), handing each result over as it arrives.

    tasks may be a generator, so that only the tasks in flight hold their imatrix weights; total is
    their Σ elements × types, for the progress bar, whose ETA then weighs big tensors and slow types fairly.
    """
    sizes: dict[str, int] = {}

    def announced() -> Iterator[TensorTask]:
        for task in tasks:
            sizes[task.tensor] = task.elements * max(1, len(task.types))
            yield task

    with tqdm(total=total, unit="w", unit_scale=True, desc="measuring", disable=not progress or total == 0) as bar:
        for result in (executor or InProcessExecutor()).map(measure_tensor, announced()):
            on_result(result)
            bar.set_postfix_str(result.tensor, refresh=False)
            bar.update(sizes.pop(result.tensor))
