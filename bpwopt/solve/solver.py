"""The solve stage: one quantization type per tensor, total bytes within a budget, least total error.

It sits between measurement and writing (measure → **solve** → write): `bpwopt.measure.measure` gives every
tensor's candidate types as (bytes, error) pairs, this module picks one per tensor, and the write
stage quantizes with the chosen types. The problem is a multiple-choice knapsack. A Lagrangian
relaxation runs first because it is nearly free and nearly right: on each tensor's lower convex
hull of (bytes, error) one multiplier λ (error per byte) prices every byte alike, and walking all
hull segments in order of slope finds the λ at the budget exactly, in milliseconds, together with
a proven lower bound L(λ) on the optimum. Its plan can only sit on hull points and may leave bytes
unspent, so an exact MILP (scipy's HiGHS) then closes the remaining gap; the Lagrangian plan is
its incumbent, and its reduced costs prune every option that cannot beat that plan (dominated
options never enter), which keeps the MILP small. If the MILP runs out of time, the better plan
found so far comes back with its gap.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from bpwopt.errors import BpwoptError

# HiGHS works with absolute tolerances (1e-6 on the MIP gap, 1e-7 on reduced costs) while errors come
# in any unit (1e-12 to 1e12). The MILP therefore sees errors relative to each tensor's best kept
# option, scaled so that the incumbent's excess error is this many units: the tolerances then sit far
# below any difference that matters, and the costs stay in a range HiGHS handles well.
_MILP_OBJECTIVE_UNITS = 1e4
# Reduced-cost pruning keeps an option unless its bound exceeds the incumbent by this relative margin,
# far above float rounding, so no option that could be optimal is dropped.
_PRUNE_MARGIN = 1e-9
_MIN_MILP_SECONDS = 1e-3
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None)  # the C library, to flush C stdio buffers
except (OSError, TypeError):  # platforms without dlopen(NULL)
    _LIBC = None


@dataclass(frozen=True, eq=False)
class TensorOptions:
    """The candidate types of one tensor: option i is `labels[i]`, costs `nbytes[i]` bytes, adds `error[i]`.

    `nbytes` is stored as int64 (n_options,) and `error` as float64 (n_options,), both read-only copies;
    errors must be finite and >= 0 (the objective, e.g. weighted squared error summed over elements).
    A tensor with a single option is pinned. Bad input raises ValueError.
    """

    name: str
    labels: tuple[str, ...]
    nbytes: np.ndarray
    error: np.ndarray

    def __post_init__(self) -> None:
        labels = tuple(self.labels)
        nbytes, error = _checked_options(self.nbytes, self.error, f"tensor {self.name!r}")
        if len(labels) != len(nbytes):
            raise ValueError(f"tensor {self.name!r}: {len(labels)} labels for {len(nbytes)} options")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "nbytes", nbytes)
        object.__setattr__(self, "error", error)


@dataclass(frozen=True, eq=False)
class Solution:
    """A plan and how good it is proven to be.

    `choice` is int64 (n_tensors,), the chosen option of every tensor in problem order. Errors are in
    the objective's unit, `multiplier` in error per byte. `gap` = (total_error - lower_bound) / total_error,
    0 when the plan is proven optimal.
    """

    choice: np.ndarray
    total_bytes: int
    total_error: float
    lower_bound: float
    gap: float
    method: str  # "lagrangian" or "milp": the stage whose plan was returned
    multiplier: float
    seconds: float

    def labels(self, problem: Sequence[TensorOptions]) -> list[str]:
        """The chosen label of every tensor of `problem`, in order."""
        return [options.labels[i] for options, i in zip(problem, self.choice, strict=True)]


def byte_range(problem: Sequence[TensorOptions]) -> tuple[int, int]:
    """The smallest and the largest total bytes any choice of options reaches."""
    if len(problem) == 0:
        return 0, 0
    counts = np.array([len(options.nbytes) for options in problem])
    nbytes = np.concatenate([options.nbytes for options in problem])
    starts = np.cumsum(counts) - counts
    return int(np.minimum.reduceat(nbytes, starts).sum()), int(np.maximum.reduceat(nbytes, starts).sum())


def lower_convex_hull(nbytes: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Indices (int64) of the options on the lower convex hull of (bytes, error), bytes increasing.

    Errors strictly decrease along the hull: an option that another one matches or beats on both bytes
    and error is dropped (of identical options the first is kept), and so are points on a straight
    segment between two hull points. These are exactly the options that some price per byte λ > 0
    makes the unique best of error + λ·bytes.
    """
    nbytes, error = _checked_options(nbytes, error, "lower_convex_hull")
    hull, length, _ = _hulls(nbytes[None, :], error[None, :], np.ones((1, len(nbytes)), dtype=bool))
    return hull[0, : length[0]].copy()


def solve(
    problem: Sequence[TensorOptions],
    budget_bytes: int,
    *,
    time_limit: float = 10.0,
    exact: bool = True,
    mip_rel_gap: float = 1e-6,
) -> Solution:
    """One option per tensor, total bytes <= `budget_bytes`, least total error.

    The Lagrangian plan (milliseconds) is improved by an exact MILP when `exact`, unless it is already
    proven within `mip_rel_gap`; the MILP stops at that relative gap or after `time_limit` seconds
    (counted for the whole call). A budget above the largest total is fine; one below the smallest
    raises BpwoptError naming the reachable range in bytes. The returned plan always fits the budget.
    While HiGHS runs, the process's stdout is sent to /dev/null (see `_stdout_silenced`).
    """
    start = time.perf_counter()
    problem = list(problem)
    budget = _checked_budget(budget_bytes)
    if not (math.isfinite(time_limit) and time_limit >= 0):
        raise ValueError(f"time_limit must be a finite number of seconds >= 0, got {time_limit}")
    if not (math.isfinite(mip_rel_gap) and mip_rel_gap >= 0):
        raise ValueError(f"mip_rel_gap must be finite and >= 0, got {mip_rel_gap}")
    smallest, largest = byte_range(problem)
    if budget < smallest:
        raise BpwoptError(
            f"budget of {budget:,} bytes is below the smallest reachable total of {smallest:,} bytes "
            f"(reachable: {smallest:,} to {largest:,} bytes)"
        )
    if not problem:
        return Solution(np.zeros(0, dtype=np.int64), 0, 0.0, 0.0, 0.0, "lagrangian", 0.0, time.perf_counter() - start)

    nbytes, error, valid = _padded(problem)
    hull, length, pareto = _hulls(nbytes, error, valid)
    choice, multiplier = _lagrangian_plan(nbytes, error, hull, length, budget)
    lower_bound = max(_dual_bound(nbytes, error, valid, budget, multiplier), float(error.min(axis=1).sum()))
    choice = _spend_slack(nbytes, error, pareto, choice, budget)
    method = "lagrangian"

    total_error = _total(error, choice)
    if exact and total_error - lower_bound > mip_rel_gap * total_error:
        seconds_left = max(time_limit - (time.perf_counter() - start), _MIN_MILP_SECONDS)
        milp_choice, milp_bound = _milp_plan(
            nbytes, error, valid, pareto, budget, choice, multiplier, mip_rel_gap, seconds_left
        )
        if milp_bound is not None:
            lower_bound = max(lower_bound, milp_bound)
        if milp_choice is not None:
            milp_choice = _fit_budget(nbytes, error, pareto, milp_choice, budget)
            milp_choice = _spend_slack(nbytes, error, pareto, milp_choice, budget)
            if (_total(error, milp_choice), _total(nbytes, milp_choice)) < (total_error, _total(nbytes, choice)):
                choice, method = milp_choice, "milp"
                total_error = _total(error, choice)

    total_bytes = _total(nbytes, choice)
    assert total_bytes <= budget, "the solver must never return a plan over budget"
    lower_bound = min(lower_bound, total_error)  # a bound above the plan is rounding noise
    gap = (total_error - lower_bound) / total_error if total_error > 0 else 0.0
    return Solution(
        choice=choice,
        total_bytes=total_bytes,
        total_error=total_error,
        lower_bound=lower_bound,
        gap=gap,
        method=method,
        multiplier=multiplier,
        seconds=time.perf_counter() - start,
    )


def _checked_options(nbytes, error, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only int64 bytes and float64 errors of one tensor's options, or ValueError saying what is wrong."""
    nbytes = np.array(nbytes)
    error = np.array(error)
    if nbytes.ndim != 1 or error.ndim != 1:
        raise ValueError(f"{where}: nbytes and error must be 1-D arrays, got shapes {nbytes.shape} and {error.shape}")
    if len(nbytes) == 0:
        raise ValueError(f"{where}: has no options")
    if len(nbytes) != len(error):
        raise ValueError(f"{where}: {len(nbytes)} byte counts but {len(error)} errors")
    if nbytes.dtype.kind == "f" and np.all(np.isfinite(nbytes)) and np.all(nbytes == np.round(nbytes)):
        nbytes = nbytes.astype(np.int64)
    if nbytes.dtype.kind not in "iu":
        raise ValueError(f"{where}: nbytes must be whole numbers of bytes, got {nbytes.dtype} {nbytes.tolist()}")
    if error.dtype.kind not in "iuf":
        raise ValueError(f"{where}: error must be numbers, got {error.dtype}")
    nbytes = nbytes.astype(np.int64)
    error = error.astype(np.float64)
    if np.any(nbytes < 0):
        raise ValueError(f"{where}: negative byte counts {nbytes.tolist()}")
    if not np.all(np.isfinite(error)):
        raise ValueError(f"{where}: errors must be finite, got {error.tolist()}")
    if np.any(error < 0):
        raise ValueError(f"{where}: errors must be >= 0, got {error.tolist()}")
    nbytes.setflags(write=False)
    error.setflags(write=False)
    return nbytes, error


def _checked_budget(budget_bytes) -> int:
    """The budget as an int; a non-integral number of bytes is rounded down (the budget is a maximum)."""
    if isinstance(budget_bytes, (int, np.integer)) and not isinstance(budget_bytes, bool):
        return int(budget_bytes)
    if isinstance(budget_bytes, (float, np.floating)) and math.isfinite(budget_bytes):
        return math.floor(budget_bytes)
    raise ValueError(f"budget_bytes must be a number of bytes, got {budget_bytes!r}")


def _padded(problem: Sequence[TensorOptions]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The options as (n_tensors, max_options) arrays: int64 bytes, float64 errors, bool valid.

    Padding holds the row's largest byte count and an infinite error, so it is never chosen.
    """
    counts = np.array([len(options.nbytes) for options in problem])
    rows = np.repeat(np.arange(len(problem)), counts)
    columns = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    shape = (len(problem), int(counts.max()))
    valid = np.zeros(shape, dtype=bool)
    valid[rows, columns] = True
    nbytes = np.zeros(shape, dtype=np.int64)
    nbytes[rows, columns] = np.concatenate([options.nbytes for options in problem])
    nbytes = np.where(valid, nbytes, nbytes.max(axis=1, keepdims=True))
    error = np.full(shape, np.inf)
    error[rows, columns] = np.concatenate([options.error for options in problem])
    return nbytes, error, valid


def _hulls(nbytes: np.ndarray, error: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's lower convex hull at once.

    Inputs are (n_tensors, n_options). Returns the hull's option indices (int64, bytes increasing,
    padded with -1), the hull lengths (n_tensors,), and the mask (n_tensors, n_options) of the options
    no other option of the row matches or beats on both bytes and error (identical ones: the first).
    """
    n_options = nbytes.shape[1]
    position = np.broadcast_to(np.arange(n_options), nbytes.shape)
    order = np.lexsort((position, error, nbytes, ~valid), axis=-1)
    sorted_bytes = np.take_along_axis(nbytes, order, axis=1)
    sorted_error = np.take_along_axis(error, order, axis=1)
    earlier_best = np.full(nbytes.shape, np.inf)
    earlier_best[:, 1:] = np.minimum.accumulate(sorted_error.T, axis=0).T[:, :-1]  # axis 0 is faster
    front = np.take_along_axis(valid, order, axis=1) & (sorted_error < earlier_best)

    # Andrew's monotone chain over the front, for all tensors at once: take the options in byte order;
    # before pushing one, pop the stack's top while the slope into it does not exceed the slope out of
    # it to the new option (it would not be strictly below the new segment). Slopes come from _slope,
    # as in the Lagrangian walk, so consecutive hull slopes strictly decrease in floating point too.
    stack = np.zeros(nbytes.shape, dtype=np.int64)  # positions in byte order
    size = np.zeros(len(nbytes), dtype=np.int64)
    for new in range(n_options):
        rows = np.flatnonzero(front[:, new])
        while True:
            deep = rows[size[rows] >= 2]
            below, top = stack[deep, size[deep] - 2], stack[deep, size[deep] - 1]
            slope_in = _slope(sorted_bytes, sorted_error, deep, below, top)
            slope_out = _slope(sorted_bytes, sorted_error, deep, top, new)
            popped = deep[slope_in <= slope_out]
            if len(popped) == 0:
                break
            size[popped] -= 1
        stack[rows, size[rows]] = new
        size[rows] += 1

    hull = np.take_along_axis(order, stack, axis=1)
    hull[np.arange(n_options)[None, :] >= size[:, None]] = -1
    pareto = np.zeros_like(valid)
    np.put_along_axis(pareto, order, front, axis=1)
    return hull, size, pareto


def _slope(nbytes: np.ndarray, error: np.ndarray, rows: np.ndarray, lower, upper) -> np.ndarray:
    """Error saved per extra byte going from option `lower` to the larger option `upper` of each row."""
    return (error[rows, lower] - error[rows, upper]) / (nbytes[rows, upper] - nbytes[rows, lower])


def _lagrangian_plan(
    nbytes: np.ndarray, error: np.ndarray, hull: np.ndarray, length: np.ndarray, budget: int
) -> tuple[np.ndarray, float]:
    """The Lagrangian plan with the most bytes <= budget, and the multiplier λ (error per byte) at the budget.

    Starting from every tensor's smallest hull option, hull segments are taken in order of decreasing
    slope (error saved per extra byte) for as long as they fit; every prefix of that order is the
    Lagrangian optimum of some λ. λ is the slope of the first segment that does not fit (0 if all fit),
    where the dual function L(λ) is largest.
    """
    rows = np.arange(len(hull))
    tensor, step = np.nonzero(np.arange(hull.shape[1] - 1)[None, :] < (length - 1)[:, None])
    lower, upper = hull[tensor, step], hull[tensor, step + 1]
    extra_bytes = nbytes[tensor, upper] - nbytes[tensor, lower]
    slope = _slope(nbytes, error, tensor, lower, upper)
    walk = np.lexsort((step, tensor, -slope))  # ties: earlier tensor first, a tensor's segments in order
    spent = int(nbytes[rows, hull[:, 0]].sum()) + np.cumsum(extra_bytes[walk])
    taken = int(np.searchsorted(spent, budget, side="right"))
    steps = np.bincount(tensor[walk[:taken]], minlength=len(hull))
    multiplier = float(slope[walk[taken]]) if taken < len(walk) else 0.0
    return hull[rows, steps], multiplier


def _dual_bound(nbytes: np.ndarray, error: np.ndarray, valid: np.ndarray, budget: int, multiplier: float) -> float:
    """L(λ) = Σ_t min_i (error + λ·bytes) − λ·budget, a lower bound on the optimal total error for any λ >= 0.

    Bytes are counted from each tensor's smallest option, which changes nothing but the rounding.
    """
    cheapest, priced = _priced(nbytes, error, valid, multiplier)
    return float(priced.min(axis=1).sum() - multiplier * (budget - int(cheapest.sum())))


def _priced(nbytes: np.ndarray, error: np.ndarray, valid: np.ndarray, multiplier: float):
    """Each row's smallest byte count (n_tensors,) and error + λ·(bytes − smallest) (n_tensors, n_options)."""
    cheapest = np.where(valid, nbytes, np.iinfo(np.int64).max).min(axis=1)
    priced = np.where(valid, error + multiplier * (nbytes - cheapest[:, None]), np.inf)
    return cheapest, priced


def _total(values: np.ndarray, choice: np.ndarray):
    total = values[np.arange(len(choice)), choice].sum()
    return int(total) if values.dtype.kind in "iu" else float(total)


def _spend_slack(
    nbytes: np.ndarray, error: np.ndarray, allowed: np.ndarray, choice: np.ndarray, budget: int
) -> np.ndarray:
    """Upgrade tensors, best error saved per extra byte first, while an upgrade still fits the budget."""
    choice = choice.copy()
    rows = np.arange(len(choice))
    spent = _total(nbytes, choice)
    while True:
        extra_bytes = nbytes - nbytes[rows, choice][:, None]
        saved_error = np.where(allowed, error[rows, choice][:, None] - error, 0.0)
        fits = allowed & (saved_error > 0) & (extra_bytes <= budget - spent)
        if not fits.any():
            return choice
        gain = np.where(fits, saved_error / np.maximum(extra_bytes, 1), -np.inf)
        tensor, option = np.unravel_index(np.argmax(gain), gain.shape)
        spent += int(extra_bytes[tensor, option])
        choice[tensor] = option


def _fit_budget(nbytes: np.ndarray, error: np.ndarray, allowed: np.ndarray, choice: np.ndarray, budget: int):
    """Downgrade tensors, least error added per byte saved first, until the plan fits the budget.

    Only needed when HiGHS, within its feasibility tolerance, returns a plan a few bytes over.
    """
    choice = choice.copy()
    rows = np.arange(len(choice))
    spent = _total(nbytes, choice)
    while spent > budget:
        saved_bytes = nbytes[rows, choice][:, None] - nbytes
        added_error = np.where(allowed, error - error[rows, choice][:, None], 0.0)
        cost = np.where(allowed & (saved_bytes > 0), added_error / np.maximum(saved_bytes, 1), np.inf)
        tensor, option = np.unravel_index(np.argmin(cost), cost.shape)
        spent -= int(saved_bytes[tensor, option])
        choice[tensor] = option
    return choice


@contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Send the process's stdout (fd 1) to /dev/null for a while.

    HiGHS 1.12 (scipy 1.17) prints a stray debug line to stdout whenever it repairs a MIP solution,
    even with logging off; on stdout that would corrupt `bpwopt --json`.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all: nothing to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        if _LIBC is not None:
            _LIBC.fflush(None)  # C stdio buffers what HiGHS printed; drop it into /dev/null, not the real stdout
        os.dup2(saved, 1)
        os.close(saved)


def _milp_plan(
    nbytes: np.ndarray,
    error: np.ndarray,
    valid: np.ndarray,
    pareto: np.ndarray,
    budget: int,
    incumbent: np.ndarray,
    multiplier: float,
    mip_rel_gap: float,
    seconds: float,
) -> tuple[np.ndarray | None, float | None]:
    """The MILP's plan (None if it found none) and its lower bound on the optimal total error (None if none).

    Only options that can still beat the incumbent enter: those on their tensor's Pareto front whose
    Lagrangian bound with that option forced, L(λ) + reduced cost, is not above the incumbent's error.
    Every plan at least as good as the incumbent survives, so the MILP's optimum is the problem's.
    """
    rows = np.arange(len(incumbent))
    cheapest, priced = _priced(nbytes, error, valid, multiplier)
    best_priced = priced.min(axis=1)
    room = budget - int(cheapest.sum())
    dual = float(best_priced.sum() - multiplier * room)  # L(λ), as in _dual_bound
    upper = _total(error, incumbent)
    margin = _PRUNE_MARGIN * (float(best_priced.sum()) + multiplier * room + upper)
    keep = pareto & (dual + (priced - best_priced[:, None]) <= upper + margin)
    keep[rows, incumbent] = True

    free = keep.sum(axis=1) > 1
    if not free.any():
        return None, upper  # every tensor has one option left: the incumbent is optimal
    tensor, option = np.nonzero(keep & free[:, None])
    least_error = np.where(keep, error, np.inf).min(axis=1)
    least_bytes = np.where(keep, nbytes, np.iinfo(np.int64).max).min(axis=1)
    excess = float((error[rows, incumbent] - least_error)[free].sum())
    if excess <= 0:
        return None, upper
    error_unit = excess / _MILP_OBJECTIVE_UNITS
    constant = float(error[rows[~free], incumbent[~free]].sum() + least_error[free].sum())
    room = budget - int(nbytes[rows[~free], incumbent[~free]].sum()) - int(least_bytes[free].sum())

    row_of = (np.cumsum(free) - 1)[tensor]
    n_vars = len(tensor)
    one_each = csr_array((np.ones(n_vars), (row_of, np.arange(n_vars))), shape=(int(free.sum()), n_vars))
    extra_bytes = nbytes[tensor, option] - least_bytes[tensor]
    # Byte counts share large factors (block sizes, row counts). Dividing them out is exact (the room
    # rounds down) and brings the row to small integers, where HiGHS's feasibility tolerance is far below one unit.
    unit = max(int(np.gcd.reduce(extra_bytes)), 1)
    weight, room = (extra_bytes // unit).astype(np.float64)[None, :], room // unit
    # HiGHS's relative gap is measured on the excess error, a part of the total: ask for the same absolute gap
    highs_gap = mip_rel_gap * upper / excess
    with _stdout_silenced():
        result = milp(
            c=(error[tensor, option] - least_error[tensor]) / error_unit,
            integrality=np.ones(n_vars),
            bounds=Bounds(0, 1),
            constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(weight, -np.inf, room)],
            options={"time_limit": seconds, "mip_rel_gap": highs_gap},
        )
    bound = result.get("mip_dual_bound")
    bound = constant + bound * error_unit if bound is not None and math.isfinite(bound) else None
    if result.x is None:
        return None, bound
    ranked = np.lexsort((-result.x, row_of))  # within each tensor, the largest x first
    first = ranked[np.r_[True, row_of[ranked][1:] != row_of[ranked][:-1]]]
    choice = incumbent.copy()
    choice[tensor[first]] = option[first]
    return choice, bound
