"""The solver: one option per tensor under a byte budget, least total error, checked against brute force."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpwopt.errors import BpwoptError
from bpwopt.solve.solver import TensorOptions, byte_range, lower_convex_hull, solve


def tensor(name: str, nbytes, error) -> TensorOptions:
    """A tensor whose options are labelled name:0, name:1, …"""
    labels = tuple(f"{name}:{i}" for i in range(len(nbytes)))
    return TensorOptions(name, labels, np.array(nbytes), np.array(error, dtype=np.float64))


def brute_force(problem: list[TensorOptions], budget: int) -> float:
    """The least total error of all choices that fit the budget, by trying every one."""
    options = [list(zip(t.nbytes.tolist(), t.error.tolist(), strict=True)) for t in problem]
    best = math.inf
    for plan in itertools.product(*options):
        if sum(nbytes for nbytes, _ in plan) <= budget:
            best = min(best, sum(error for _, error in plan))
    return best


def chosen(problem: list[TensorOptions], choice: np.ndarray) -> tuple[int, float]:
    """Total bytes and total error of a choice, recomputed from the problem."""
    return (
        sum(int(t.nbytes[i]) for t, i in zip(problem, choice, strict=True)),
        sum(float(t.error[i]) for t, i in zip(problem, choice, strict=True)),
    )


@st.composite
def problems(draw) -> tuple[list[TensorOptions], int]:
    """1–6 tensors of 1–5 options, few distinct byte counts and errors (many ties), a budget in range."""
    problem = []
    for t in range(draw(st.integers(1, 6))):
        n_options = draw(st.integers(1, 5))
        nbytes = draw(st.lists(st.integers(0, 40), min_size=n_options, max_size=n_options))
        error = st.one_of(st.sampled_from([0.0, 1.0, 2.5]), st.floats(0, 100, allow_subnormal=False))
        problem.append(tensor(f"t{t}", nbytes, draw(st.lists(error, min_size=n_options, max_size=n_options))))
    smallest, largest = byte_range(problem)
    return problem, draw(st.integers(smallest, largest))


def curve_problem(n_tensors: int, n_options: int, seed: int) -> list[TensorOptions]:
    """Tensors shaped like a model's: error ∝ elements × 2^(−2·bpw) × a per-tensor scale, with noise."""
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.uniform(2.5, 16, n_options))
    problem = []
    for t in range(n_tensors):
        elements = 256 * int(rng.integers(1_000, 100_000))
        scale = 10 ** rng.uniform(0, 4)
        error = elements * 2.0 ** (-2 * bits) * scale * rng.lognormal(0, 0.05, n_options)
        problem.append(tensor(f"t{t}", (elements * bits / 8).astype(np.int64), error))
    return problem


# lower_convex_hull


def test_hull_keeps_convex_points_in_byte_order():
    # (10, 8) (20, 4) (30, 2) (40, 1): slopes 0.4, 0.2, 0.1 decrease, all on the hull; given unsorted
    assert lower_convex_hull([40, 10, 30, 20], [1, 8, 2, 4]).tolist() == [1, 3, 2, 0]


def test_hull_drops_dominated_options():
    # (25, 5) costs more than (20, 4) and is worse; (50, 1) costs more than (40, 1) for the same error
    assert lower_convex_hull([10, 20, 30, 40, 25, 50], [8, 4, 2, 1, 5, 1]).tolist() == [0, 1, 2, 3]


def test_hull_drops_points_above_the_chord_and_collinear_points():
    assert lower_convex_hull([10, 20, 30], [10, 9, 0]).tolist() == [0, 2]  # (20, 9) lies above the chord
    assert lower_convex_hull([10, 20, 30], [3, 2, 1]).tolist() == [0, 2]  # (20, 2) lies on it


def test_hull_of_ties():
    assert lower_convex_hull([10, 10, 5], [1, 1, 1]).tolist() == [2]  # same error: fewest bytes
    assert lower_convex_hull([10, 10], [2, 1]).tolist() == [1]  # same bytes: least error
    assert lower_convex_hull([10, 10], [1, 1]).tolist() == [0]  # identical: the first
    assert lower_convex_hull([7], [3]).tolist() == [0]


def hull_by_definition(nbytes: list[int], error: list[int]) -> list[int]:
    """Options that some λ > 0 makes the strict best of error + λ·bytes, in byte order, in exact arithmetic.

    Of identical options, the first counts.
    """
    points = list(zip(nbytes, error, strict=True))
    hull = []
    for j, (b, e) in enumerate(points):
        others = [(bi, ei) for bi, ei in points if (bi, ei) != (b, e)]
        if (b, e) in points[:j] or any(bi == b and ei < e for bi, ei in others):
            continue
        lowest = max([Fraction(e - ei, bi - b) for bi, ei in others if bi > b] + [Fraction(0)])
        highest = min([Fraction(ei - e, b - bi) for bi, ei in others if bi < b], default=math.inf)
        if lowest < highest:
            hull.append(j)
    return sorted(hull, key=lambda j: nbytes[j])


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=8))
def test_hull_matches_its_definition(points):
    nbytes, error = (list(values) for values in zip(*points, strict=True))
    assert lower_convex_hull(nbytes, error).tolist() == hull_by_definition(nbytes, error)


# solve: small examples


def test_solve_against_a_hand_solved_example():
    problem = [tensor("attn", [10, 20, 30], [9.0, 4.0, 1.0]), tensor("ffn", [10, 20, 30], [5.0, 3.0, 2.0])]
    # plans within 40 bytes: attn:0+ffn:0..2 = 14, 12, 11; attn:1+ffn:0..1 = 9, 7; attn:2+ffn:0 = 6
    solution = solve(problem, 40)
    assert solution.labels(problem) == ["attn:2", "ffn:0"]
    assert (solution.total_bytes, solution.total_error, solution.gap) == (40, 6.0, 0.0)
    assert solution.choice.tolist() == [2, 0]


def test_milp_closes_the_gap_the_lagrangian_leaves():
    # The Lagrangian takes A's upgrade first (best slope, 1.0 per byte), then B's and C's do not fit;
    # spending the 12 bytes on B and C instead is better.
    problem = [tensor("A", [0, 10], [10.0, 0.0]), tensor("B", [0, 6], [5.9, 0.0]), tensor("C", [0, 6], [5.9, 0.0])]
    lagrangian = solve(problem, 12, exact=False)
    exact = solve(problem, 12)
    assert (lagrangian.method, lagrangian.choice.tolist(), lagrangian.total_error) == ("lagrangian", [1, 0, 0], 11.8)
    price = 5.9 / 6  # λ, error per byte: the slope of the first upgrade that did not fit
    assert lagrangian.multiplier == pytest.approx(price)
    assert lagrangian.lower_bound == pytest.approx(min(10.0, 10 * price) + 5.9 + 5.9 - 12 * price)  # Σ min(e+λb) − λB
    assert lagrangian.gap == pytest.approx((11.8 - lagrangian.lower_bound) / 11.8)
    assert (exact.method, exact.choice.tolist(), exact.total_error, exact.gap) == ("milp", [0, 1, 1], 10.0, 0.0)


def test_pinned_tensors_keep_their_only_option():
    problem = [tensor("norm", [400], [0.0]), tensor("w", [10, 20, 40], [4.0, 2.0, 1.0]), tensor("emb", [100], [7.0])]
    for budget in range(510, 541, 5):
        solution = solve(problem, budget)
        assert solution.labels(problem)[::2] == ["norm:0", "emb:0"]
        assert solution.total_bytes <= budget


def test_budget_above_the_range_gives_the_least_error_plan():
    problem = [tensor("a", [10, 20, 30], [3.0, 1.0, 1.0]), tensor("b", [5, 50], [2.0, 0.5])]
    solution = solve(problem, 10**12)
    assert solution.labels(problem) == ["a:1", "b:1"]  # a:2 is no better than a:1, so not worth its bytes
    assert (solution.total_error, solution.gap, solution.multiplier) == (1.5, 0.0, 0.0)


def test_ties_prefer_fewer_bytes_and_results_repeat():
    problem = [tensor(f"t{t}", [10, 20, 20, 30], [2.0, 1.0, 1.0, 1.0]) for t in range(4)]
    first = solve(problem, 75)
    assert first.choice.tolist() == solve(problem, 75).choice.tolist()
    assert (first.total_bytes, first.total_error) == (70, 5.0)  # three upgraded to error 1.0, one left at 2.0
    assert sorted(first.choice.tolist()) == [0, 1, 1, 1]  # never the equal-error options with more bytes


def test_budget_below_the_range_names_the_range():
    problem = [tensor("a", [10, 20, 30], [3.0, 2.0, 1.0]), tensor("b", [20, 30, 60], [3.0, 2.0, 1.0])]
    assert byte_range(problem) == (30, 90)
    with pytest.raises(BpwoptError, match=r"below the smallest .* \(reachable: 30 to 90 bytes\)"):
        solve(problem, 29)


def test_no_tensors():
    solution = solve([], 0)
    assert (solution.choice.tolist(), solution.total_bytes, solution.total_error, solution.gap) == ([], 0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("nbytes", "error", "message"),
    [
        ([], [], "has no options"),
        ([1, 2], [1.0], "2 byte counts but 1 errors"),
        ([[1, 2]], [[1.0, 2.0]], "must be 1-D"),
        ([1, 2], [1.0, math.nan], "must be finite"),
        ([1, 2], [1.0, math.inf], "must be finite"),
        ([1, 2], [1.0, -0.5], "must be >= 0"),
        ([1, -2], [1.0, 0.5], "negative byte counts"),
        ([1, 2.5], [1.0, 0.5], "whole numbers of bytes"),
    ],
)
def test_bad_options_are_refused(nbytes, error, message):
    with pytest.raises(ValueError, match=message):
        TensorOptions("w", tuple("ab"[: len(nbytes)]), np.array(nbytes), np.array(error))
    with pytest.raises(ValueError, match=message):
        lower_convex_hull(np.array(nbytes), np.array(error))


def test_bad_labels_and_budgets_are_refused():
    with pytest.raises(ValueError, match="2 labels for 1 options"):
        TensorOptions("w", ("Q4_K", "Q8_0"), np.array([10]), np.array([1.0]))
    problem = [tensor("a", [10, 20], [2.0, 1.0])]
    for budget in (math.nan, "20", None):
        with pytest.raises(ValueError, match="budget_bytes"):
            solve(problem, budget)
    with pytest.raises(ValueError, match="time_limit"):
        solve(problem, 20, time_limit=-1)


# solve: properties


@settings(max_examples=150, deadline=None)
@given(problems())
def test_exact_solve_matches_brute_force(case):
    problem, budget = case
    solution = solve(problem, budget, mip_rel_gap=0.0)
    assert solution.total_bytes <= budget
    assert (solution.total_bytes, solution.total_error) == chosen(problem, solution.choice)
    assert solution.total_error == pytest.approx(brute_force(problem, budget), rel=1e-9, abs=1e-12)
    assert solution.lower_bound <= solution.total_error


@settings(max_examples=150, deadline=None)
@given(problems())
def test_lagrangian_plan_fits_and_its_bound_brackets_the_optimum(case):
    problem, budget = case
    solution = solve(problem, budget, exact=False)
    best = brute_force(problem, budget)
    assert solution.method == "lagrangian"
    assert solution.total_bytes <= budget
    assert (solution.total_bytes, solution.total_error) == chosen(problem, solution.choice)
    assert solution.lower_bound <= best * (1 + 1e-9) + 1e-12
    assert best <= solution.total_error * (1 + 1e-12)
    assert 0.0 <= solution.gap <= 1.0


def test_errors_spanning_eighteen_decades_are_solved_exactly():
    rng = np.random.default_rng(7)
    problem = []
    for t, scale in enumerate([1e-12, 1e-9, 1e-3, 1.0, 1e3, 1e6]):
        nbytes = np.sort(rng.choice(np.arange(10, 200), size=4, replace=False))
        problem.append(tensor(f"t{t}", nbytes, scale * np.sort(rng.uniform(0.1, 1.0, 4))[::-1]))
    smallest, largest = byte_range(problem)
    for budget in np.linspace(smallest, largest, 9).astype(int).tolist():
        solution = solve(problem, budget, mip_rel_gap=0.0)
        assert solution.total_bytes <= budget
        assert solution.total_error == pytest.approx(brute_force(problem, budget), rel=1e-9)


def test_the_plan_does_not_depend_on_the_unit_of_error():
    problem = curve_problem(40, 6, seed=3)
    budget = sum(byte_range(problem)) // 3
    plans = []
    for unit in (2.0**-40, 1.0, 2.0**40):  # powers of two scale every float exactly
        scaled = [TensorOptions(t.name, t.labels, t.nbytes, t.error * unit) for t in problem]
        plans.append(solve(scaled, budget).choice.tolist())
    assert plans[0] == plans[1] == plans[2]


def test_three_hundred_tensors_solve_to_a_proven_small_gap_in_seconds():
    problem = curve_problem(300, 10, seed=1)
    smallest, largest = byte_range(problem)
    budget = smallest + (largest - smallest) // 4
    solution = solve(problem, budget, time_limit=30.0)
    assert solution.total_bytes <= budget
    assert solution.gap <= 1e-6
    assert solution.lower_bound <= solution.total_error
    assert solution.seconds < 10.0


def test_nothing_reaches_stdout(capfd):
    # HiGHS 1.12 prints stray debug lines while solving this one; stdout carries `bpwopt --json`
    problem = curve_problem(300, 10, seed=1)
    smallest, largest = byte_range(problem)
    solve(problem, smallest + (largest - smallest) // 4)
    assert capfd.readouterr().out == ""


def test_out_of_time_milp_still_returns_a_plan_that_fits():
    problem = curve_problem(300, 10, seed=2)
    budget = sum(byte_range(problem)) // 2
    solution = solve(problem, budget, time_limit=0.0)
    assert solution.total_bytes <= budget
    assert (solution.total_bytes, solution.total_error) == pytest.approx(chosen(problem, solution.choice))
    assert solution.lower_bound == pytest.approx(solution.total_error * (1 - solution.gap))
