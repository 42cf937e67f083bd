"""Measure stage: the squared error every candidate type adds to every tensor the optimizer may vary.

Every candidate type is round-tripped through the same kernels the write
stage uses, with the tensor's imatrix exactly as the final quantization will
use it; the fused kernel returns per-row Σ w(x−x̂)² and Σ (x−x̂)², which sum to
the tensor's error. Rows are what is sampled, not blocks: llama.cpp's imatrix
quantizers weigh each block by its row's mean square, so a block's bytes
depend on its whole row. What is estimated is each error sum relative to the
tensor's signal (`estimate_ratio`), the quantity the objectives compare, and
far steadier than the sum itself where row scales vary; it is stored times
the record's energy. A tensor's sample is stratified and seeded and grows in
rounds (64 rows, then 128, ...): a candidate stops once the relative
standard error of both its ratios is below `Sampling.rse`, or once a no larger
type clearly errs less (it cannot be on the tensor's front, so no plan needs
its precision), or at `Sampling.max_rows`; `--precise` measures every row.
The standard error of each estimate is kept beside it. One tensor is one task
(`measure_tensor`, picklable in and out), run by an executor
(`bpwopt.measure.executors`) with an error backend (`bpwopt.measure.backends`);
each tensor's result goes to the caller as soon as it exists, so the state
file commits it before the next one is handed over.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from bpwopt.errors import BpwoptError
from bpwopt.formats.splits import open_model
from bpwopt.measure.backends import BACKENDS, DEFAULT_BACKEND, ErrorBackend
from bpwopt.measure.executors import Executor, InProcessExecutor
from bpwopt.measure.records import STATISTICS, Estimate, Measurement, TensorRecord
from bpwopt.policy.llama import fallback_type
from bpwopt.quant import codec
from bpwopt.quant.types import DEFAULT_ROUNDING, QUANT_TYPES, row_bytes
from bpwopt.source.rows import expert_count, invalid_data, release_pages, rows_to_float, tensor_rows

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
DOMINANCE_MARGIN = 2.0  # standard errors: a type is dominated only where its error is that far above another's


@dataclass(frozen=True)
class Sampling:
    """Which rows are measured: every row (precise), or a seeded stratified sample grown until it is precise enough.

    A candidate is measured on start_rows rows, then on twice as many, and so
    on, until the relative standard error of both its error sums is at most
    rse, it is dominated, every row is in, or max_rows is reached.
    """

    max_rows: int = 1024
    seed: int = 0
    precise: bool = False
    start_rows: int = 64
    rse: float = 0.05

    def __post_init__(self) -> None:
        if self.max_rows < 2:  # two rows per stratum at the least, or there is no standard error
            raise BpwoptError("--sample-rows must be at least 2")
        if not 0 <= self.rse < 1:
            raise BpwoptError(f"--sample-rse must be at least 0 and below 1, not {self.rse}")

    @property
    def first_rows(self) -> int:
        """Rows of the first round: start_rows, but never more than the cap."""
        return max(2, min(self.start_rows, self.max_rows))

    def most_rows(self, n_rows: int) -> int:
        """The most rows of a tensor's n_rows that are measured: what its measuring time scales with."""
        return n_rows if self.precise else min(n_rows, self.max_rows)

    def describe(self) -> str:
        """Canonical text for the state's identity: measurements are reusable only under equal sampling."""
        if self.precise:
            return "precise"
        return f"rows={self.first_rows}..{self.max_rows};rse<={self.rse:g};seed={self.seed}"


@dataclass(frozen=True)
class RowSample:
    """Row indices to measure and the weights that turn their errors into whole-tensor estimates."""

    rows: np.ndarray  # int64 (n,)
    strata: np.ndarray  # int64 (n,), stratum of each row
    stratum_sizes: np.ndarray  # int64 (n_strata,), rows of the tensor in each stratum
    complete: bool  # every row is measured: the estimate is exact


@dataclass(frozen=True)
class SampleOrder:
    """The rows of a tensor in the order the rounds add them: by rank within their stratum, then by stratum.

    Each stratum's rows are in a seeded random order; the first m of every
    stratum are a stratified sample, and the sample of 2m rows per stratum
    contains the one of m, so a round measures only the rows it adds.
    """

    rows: np.ndarray  # int64, up to the cap
    strata: np.ndarray  # int64, stratum of each
    ranks: np.ndarray  # int64, non-decreasing: position of each row in its stratum's order
    stratum_sizes: np.ndarray  # int64 (n_strata,)
    per_stratum: tuple[int, ...]  # rows per stratum of each round

    def first(self, per_stratum: int) -> RowSample:
        """The sample of the first per_stratum rows of every stratum (all of a smaller stratum's)."""
        k = int(np.searchsorted(self.ranks, per_stratum))
        complete = k == int(self.stratum_sizes.sum())
        return RowSample(self.rows[:k], self.strata[:k], self.stratum_sizes, complete)

    def rounds(self) -> Iterator[RowSample]:
        """The growing samples, smallest first; the last one is the largest sampling allows."""
        return (self.first(m) for m in self.per_stratum)


def candidate_types(row_length: int, candidates: Iterable[GGMLQuantizationType]) -> tuple[GGMLQuantizationType, ...]:
    """The types a tensor with this row length can take: llama.cpp's fallbacks applied, smallest first.

    A candidate llama.cpp has no fallback for (Q1_0 on rows that are not a multiple of 128) is left out.
    """
    fitted = set()
    for candidate in candidates:
        with contextlib.suppress(BpwoptError):
            fitted.add(fallback_type(candidate, row_length))
    return tuple(sorted(fitted, key=lambda t: (QUANT_TYPES[t].bits_per_weight, t.name)))


def sample_order(n_rows: int, sampling: Sampling, tensor_name: str, row_size: np.ndarray | None = None) -> SampleOrder:
    """The nested stratified samples of one tensor, two rows per stratum in the first round.

    Strata are contiguous runs of rows in the order of row_size (their
    energies), cut so that each holds an equal share of the total: the few
    rows that carry much of a tensor's signal (an outlier channel's rows) fall
    in strata of their own and are measured whole, where a uniform sample
    would miss them and be confidently wrong. Without row_size the strata are
    equal runs of rows in file order. The seed mixes in the tensor's name so
    that tensors of the same shape do not share row positions.
    """
    if sampling.precise or n_rows <= sampling.first_rows:
        everything = np.arange(n_rows, dtype=np.int64)
        return SampleOrder(everything, np.zeros(n_rows, np.int64), everything, np.array([n_rows], np.int64), (n_rows,))
    n_strata = min(sampling.first_rows, n_rows) // _ROWS_PER_STRATUM
    by_size = np.arange(n_rows, dtype=np.int64)
    if row_size is not None and row_size.sum() > 0:
        by_size = np.argsort(row_size, kind="stable")
        sizes = row_size[by_size]
        alone = sizes >= sizes.sum() / n_strata  # a row of a whole stratum's share is a stratum of its own
        light = np.flatnonzero(~alone)
        shared = max(1, n_strata - int(alone.sum()))
        before = np.cumsum(sizes[light]) - sizes[light]  # each row's start in the cumulated energy of the rest
        stratum = np.empty(n_rows, np.int64)
        stratum[light] = np.minimum((shared * before / max(sizes[light].sum(), 1e-300)).astype(np.int64), shared - 1)
        stratum[alone] = shared + np.arange(int(alone.sum()))
    else:
        stratum = np.arange(n_rows, dtype=np.int64) * n_strata // n_rows
    stratum = np.unique(stratum, return_inverse=True)[1].astype(np.int64)  # ids skipped by a wide row: renumber
    sizes = np.bincount(stratum)
    cap = max(_ROWS_PER_STRATUM, sampling.max_rows // sizes.size)
    rng = np.random.default_rng([sampling.seed, zlib.crc32(tensor_name.encode())])
    ranks = np.empty(n_rows, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for start, size in zip(starts, sizes, strict=True):
        ranks[start : start + size] = rng.permutation(size)
    kept = ranks < cap
    order = np.lexsort((stratum[kept], ranks[kept]))
    per_stratum = [m for m in (_ROWS_PER_STRATUM << k for k in range(64)) if m < min(cap, int(sizes.max()))]
    per_stratum.append(min(cap, int(sizes.max())))
    rows, strata, rank = by_size[kept][order], stratum[kept][order], ranks[kept][order]
    return SampleOrder(rows, strata, rank, sizes, tuple(per_stratum))


def estimate_total(per_row: np.ndarray, sample: RowSample) -> tuple[float, float]:
    """Stratified estimate of a per-row quantity's sum over all rows, and its standard error."""
    if sample.complete:
        return float(per_row.sum()), 0.0
    n_strata = sample.stratum_sizes.size
    counts = np.bincount(sample.strata, minlength=n_strata)
    sums = np.bincount(sample.strata, weights=per_row, minlength=n_strata)
    means = sums / counts
    squares = np.bincount(sample.strata, weights=(per_row - means[sample.strata]) ** 2, minlength=n_strata)
    # a stratum of one row is measured whole (its term is exact); every other has at least two rows sampled
    variances = np.divide(squares, counts - 1, out=np.zeros(n_strata), where=counts > 1)
    sizes = sample.stratum_sizes.astype(np.float64)
    total = float((sizes * means).sum())
    variance = float((sizes**2 * (1 - counts / sizes) * variances / counts).sum())
    return total, variance**0.5


@dataclass(frozen=True)
class TensorRows:
    """Some rows of one tensor as float32, with the imatrix weights of each row's expert."""

    name: str
    values: np.ndarray  # float32 (n, n_per_row)
    expert_of_row: np.ndarray  # int64 (n,)
    weights: np.ndarray | None  # float32 (n_expert, n_per_row), or None without an imatrix
    source_type: GGMLQuantizationType


def load_rows(tensor: gguf.ReaderTensor, weights: np.ndarray | None, rows: np.ndarray) -> TensorRows:
    """Dequantize the given rows of one tensor; memory is those rows as float32.

    weights: the tensor's imatrix weights, float32 (n_expert, n_per_row) (`Imatrix.weights_for`), or None.
    """
    raw = tensor_rows(tensor)
    source_type = GGMLQuantizationType(tensor.tensor_type)
    picked = raw if rows.size == raw.shape[0] and np.array_equal(rows, np.arange(rows.size)) else raw[rows]
    values = np.ascontiguousarray(rows_to_float(picked, source_type, tensor.name), dtype=np.float32)
    expert_of_row = rows // (raw.shape[0] // expert_count(tensor))
    return TensorRows(tensor.name, values, expert_of_row, weights, source_type)


def row_energies(rows: TensorRows) -> tuple[np.ndarray, np.ndarray]:
    """Per row (Σ w x², Σ x²): the scale of the signal its error is compared with."""
    squares = rows.values.astype(np.float64) ** 2
    plain = squares.sum(axis=1)
    weighted = (squares * rows.weights[rows.expert_of_row]).sum(axis=1) if rows.weights is not None else plain
    return weighted, plain


def all_row_energies(tensor: gguf.ReaderTensor, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row (Σ w x², Σ x²) of every row of the tensor, read in pieces of about 16 MB of float32.

    Cheap next to quantizing (one fused decode-and-square pass over the file's
    bytes), and what makes a small sample trustworthy: the strata follow the
    energies, and the record holds the exact totals the measured ratios are
    scaled by. Rows with NaN or infinite values are refused here, as llama.cpp does.
    """
    n_per_row = int(tensor.shape[0])
    n_rows = int(tensor.n_elements) // n_per_row
    source_type = GGMLQuantizationType(tensor.tensor_type)
    weighted, plain = np.empty(n_rows), np.empty(n_rows)
    step = max(1, (1 << 22) // n_per_row)
    raw = tensor_rows(tensor)
    expert_of_row = np.arange(n_rows) // (n_rows // expert_count(tensor))
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        if source_type in QUANT_TYPES:
            energies = codec.row_energies(raw[start:stop], source_type, weights, expert_of_row[start:stop])
        else:  # decoded by gguf's numpy code, which also refuses non-finite rows
            energies = row_energies(load_rows(tensor, weights, np.arange(start, stop)))
        weighted[start:stop], plain[start:stop] = energies
    if not np.isfinite(plain).all():
        raise invalid_data(tensor.name)
    return weighted, plain


def row_errors(
    rows: TensorRows, qtype: GGMLQuantizationType, backend: ErrorBackend, rounding: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per row (Σ w(x−x̂)², Σ (x−x̂)²) of a round trip through qtype.

    A candidate equal to the source type costs nothing: the write stage copies
    those bytes unchanged, so the error it adds is exactly zero.
    """
    n = rows.values.shape[0]
    if qtype == rows.source_type:
        return np.zeros(n), np.zeros(n)
    weighted, plain = np.empty(n), np.empty(n)
    for expert in np.unique(rows.expert_of_row):
        mask = rows.expert_of_row == expert
        values = rows.values if mask.all() else np.ascontiguousarray(rows.values[mask])
        expert_weights = rows.weights[expert] if rows.weights is not None else None
        try:
            weighted[mask], plain[mask] = backend.row_errors(values, qtype, expert_weights, rounding)
        except ValueError as error:  # NaN or infinite weights in the file: llama-quantize refuses them too
            raise BpwoptError(f"{rows.name}: cannot quantize to {qtype.name}: {error}") from error
    return weighted, plain


def estimate_ratio(per_row: np.ndarray, energy: np.ndarray, sample: RowSample) -> Estimate:
    """Stratified ratio estimate of Σ per_row / Σ energy over all rows, and its standard error.

    Errors scale with their row's energy (a row twice as large errs four times
    as much), so the ratio is far steadier than either sum where row scales
    vary; it is what the objectives compare (an error relative to its tensor's
    signal). Its standard error linearizes the residuals per_row − r·energy.
    """
    errors, energies = estimate_total(per_row, sample)[0], estimate_total(energy, sample)[0]
    if energies == 0:  # rows of zeros: nothing to be relative to, and nothing to err on
        return Estimate(0.0, 0.0)
    ratio = errors / energies
    return Estimate(ratio, estimate_total(per_row - ratio * energy, sample)[1] / energies)


# The signal each error statistic is relative to: the tensor's weighted or plain energy.
_ENERGY_OF = {"weighted_sse": "weighted", "sse": "plain"}


@dataclass
class _Candidate:
    """One type's per-row errors so far, in the sample order, and their ratios to the rows' energies."""

    qtype: GGMLQuantizationType
    nbytes: int
    per_row: dict[str, list[np.ndarray]]  # by statistic: one array per round
    ratios: dict[str, Estimate] = field(default_factory=dict)  # by statistic: error over energy
    rows: int = 0
    seconds: float = 0.0

    def settled(self, rse: float) -> bool:
        """Both ratios are within rse of their value (relative standard error), or exact."""
        return all(e.stderr <= rse * abs(e.value) for e in self.ratios.values())

    def dominated_by(self, other: _Candidate) -> bool:
        """other is no larger and clearly errs less in both statistics: no plan needs this type's precision."""
        if other is self or other.nbytes > self.nbytes:
            return False
        return all(
            other.ratios[s].value + DOMINANCE_MARGIN * other.ratios[s].stderr
            < self.ratios[s].value - DOMINANCE_MARGIN * self.ratios[s].stderr
            for s in self.ratios
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
    work: int  # weights quantized at most: row length × Sampling.most_rows × types, so a driver can weigh progress
    backend: str = DEFAULT_BACKEND  # a name in BACKENDS
    rounding: str = DEFAULT_ROUNDING  # the quantizers measured: a name in bpwopt.quant.types.ROUNDINGS


@dataclass(frozen=True)
class TensorResult:
    """What measuring one tensor gives: its record (if asked for) and a measurement per type of the task."""

    tensor: str
    record: TensorRecord | None
    measurements: tuple[Measurement, ...]
    dominated: tuple[str, ...] = ()  # types whose sample stopped growing because a smaller type errs clearly less


def measure_tensor(task: TensorTask) -> TensorResult:
    """Measure every type of task on one tensor, in rounds of a growing row sample.

    Each round reads only the rows it adds and measures only the types not yet
    settled (precise enough, or dominated); peak memory is one round's rows as float32.
    """
    tensor = _tensors_of(*_file_key(task.model_path)).get(task.tensor)
    if tensor is None:
        raise BpwoptError(f"{task.model_path} has no tensor {task.tensor}")
    n_per_row = int(tensor.shape[0])
    total_rows = int(tensor.n_elements) // n_per_row
    energy = dict(zip(("weighted", "plain"), all_row_energies(tensor, task.weights), strict=True))
    totals = {key: float(per_row.sum()) for key, per_row in energy.items()}
    # a row's share of the weighted energy plus its share of the plain one: heavy in either, it stands alone
    row_size = sum((energy[key] / totals[key] for key in energy if totals[key] > 0), np.zeros(total_rows))
    order = sample_order(total_rows, task.sampling, task.tensor, row_size)
    backend = BACKENDS[task.backend]
    candidates = [
        _Candidate(Q[name], total_rows * row_bytes(Q[name], n_per_row), {s: [] for s in STATISTICS})
        for name in task.types
    ]
    pending, dominated, loaded = list(candidates), [], 0
    for sample in order.rounds():
        rows = load_rows(tensor, task.weights, sample.rows[loaded:])
        loaded = sample.rows.size
        sampled_energy = {key: per_row[sample.rows] for key, per_row in energy.items()}
        for candidate in pending:
            started = time.perf_counter()
            for statistic, per_row in zip(STATISTICS, row_errors(rows, candidate.qtype, backend, task.rounding),
                                          strict=True):  # fmt: skip
                candidate.per_row[statistic].append(per_row)
                candidate.ratios[statistic] = estimate_ratio(
                    np.concatenate(candidate.per_row[statistic]), sampled_energy[_ENERGY_OF[statistic]], sample
                )
            candidate.rows = sample.rows.size
            candidate.seconds += time.perf_counter() - started
        beaten = [c for c in pending if any(c.dominated_by(other) for other in candidates)]
        dominated += [c.qtype.name for c in beaten if not c.settled(task.sampling.rse)]
        pending = [c for c in pending if c not in beaten and not c.settled(task.sampling.rse)]
        if not pending:
            break
    release_pages(tensor)  # a view of F32 rows faults its pages back in if read again
    source_type = GGMLQuantizationType(tensor.tensor_type)
    record = tensor_record(tensor, task.category, source_type, totals) if task.needs_record else None
    measured = tuple(
        Measurement(task.tensor, c.qtype.name, c.nbytes, _totals(c.ratios, totals), c.rows, total_rows, c.seconds)
        for c in candidates
    )
    return TensorResult(task.tensor, record, measured, tuple(dominated))


def _totals(ratios: dict[str, Estimate], energies: dict[str, float]) -> dict[str, Estimate]:
    """Whole-tensor error sums from their ratios: each ratio times the energy the record keeps.

    So an objective that divides by the record's energy sees exactly the ratio
    measured; where every row was measured it is the exact sum.
    """
    return {
        s: Estimate(e.value * energies[_ENERGY_OF[s]], e.stderr * energies[_ENERGY_OF[s]]) for s, e in ratios.items()
    }


def tensor_record(
    tensor: gguf.ReaderTensor, category: str, source_type: GGMLQuantizationType, energies: dict[str, float]
) -> TensorRecord:
    """What the state keeps about a measured tensor (its signal energies make errors relative)."""
    layer = _LAYER.match(tensor.name)
    return TensorRecord(
        name=tensor.name,
        shape=tuple(int(n) for n in tensor.shape),
        elements=int(tensor.n_elements),
        source_type=source_type.name,
        category=category,
        layer=int(layer.group(1)) if layer else None,
        weight_energy=energies["weighted"],
        plain_energy=energies["plain"],
    )


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
    their Σ work, for the progress bar, whose ETA then weighs big tensors and long type lists fairly.
    """
    sizes: dict[str, int] = {}

    def announced() -> Iterator[TensorTask]:
        for task in tasks:
            sizes[task.tensor] = task.work
            yield task

    with tqdm(total=total, unit="w", unit_scale=True, desc="measuring", disable=not progress or total == 0) as bar:
        for result in (executor or InProcessExecutor()).map(measure_tensor, announced()):
            on_result(result)
            bar.set_postfix_str(result.tensor, refresh=False)
            bar.update(sizes.pop(result.tensor))
