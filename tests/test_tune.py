"""`bpwopt tune`: tuned factors in the objective, and a small optuna study on the demo model that resumes."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import replace

import gguf
import pytest

from bpwopt.cli.main import main
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.measure.measure import Sampling
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.quality.tune import TrialResult, choose_trial, storage_path, tune
from bpwopt.solve.objective import DEPTH_KEY, tuned_factor
from bpwopt.solve.targets import Target
from bpwopt.state.store import StateFile, TensorRecord, read_identity

Q = gguf.GGMLQuantizationType
CANDIDATES = (Q.Q4_0, Q.Q5_0, Q.Q8_0)  # few types: measuring the demo stays fast


def record(category: str, layer: int | None) -> TensorRecord:
    return TensorRecord(f"blk.{layer}.{category}.weight", (64, 8), 512, "F32", category, layer, 1.0, 1.0)


def test_tuned_factor_is_class_factor_times_exp_depth_at_the_layer_position():
    tuning = {"attn_v": 4.0, DEPTH_KEY: 0.5}
    assert tuned_factor(record("attn_v", 0), tuning, 11) == pytest.approx(4.0 * math.exp(-0.5))
    assert tuned_factor(record("attn_v", 5), tuning, 11) == pytest.approx(4.0)
    assert tuned_factor(record("attn_v", 10), tuning, 11) == pytest.approx(4.0 * math.exp(0.5))
    assert tuned_factor(record("ffn_up", 10), tuning, 11) == pytest.approx(math.exp(0.5))  # no class factor: 1
    assert tuned_factor(record("token_embd", None), tuning, 11) == 1.0  # outside the blocks: no depth
    assert tuned_factor(record("attn_v", 0), {}, 11) == 1.0


@pytest.fixture(scope="module")
def solve(demo_model_path, tmp_path_factory) -> OptimizeJob:
    """A solve template on a measured state of the demo model."""
    state = tmp_path_factory.mktemp("tune") / "smollm2.bpw_state"
    job = OptimizeJob(
        input_path=demo_model_path, output_path=None, target=Target(bits_per_weight=5.5),
        options=QuantizeOptions(allow_requantize=True), candidates=CANDIDATES, sampling=Sampling(max_rows=64),
        state_path=state, dry_run=True, progress=False,
    )  # fmt: skip
    optimize_file(job)
    return job


def ffn_down_bytes(job: OptimizeJob) -> int:
    return sum(t.data_bytes for t in optimize_file(job).tensors if t.category == "ffn_down")


@pytest.mark.slow  # solves (and evaluates) the demo model
def test_a_stored_class_factor_moves_bytes_to_that_class(solve):
    plain = ffn_down_bytes(solve)
    assert ffn_down_bytes(replace(solve, tuning={"ffn_down": 1000.0})) > plain
    with StateFile.open(solve.state_path, read_identity(solve.state_path), create=False) as state:
        state.set_values("tuned", {"ffn_down": 1000.0})
    try:
        assert ffn_down_bytes(solve) > plain  # the stored factors are used by default …
        assert ffn_down_bytes(replace(solve, ignore_importance=True)) == plain  # … and not with this
    finally:
        with StateFile.open(solve.state_path, read_identity(solve.state_path), create=False) as state:
            state.set_values("tuned", {})


@pytest.mark.slow  # solves (and evaluates) the demo model
def test_a_state_made_before_the_tuned_table_reads_it_as_empty(solve, tmp_path):
    old = tmp_path / "old.bpw_state"
    old.write_bytes(solve.state_path.read_bytes())
    with sqlite3.connect(old) as db:
        db.execute("DROP TABLE tuned")
    with StateFile.open(old, read_identity(old), create=False) as state:
        assert state.values("tuned") == {}
        state.set_values("tuned", {"attn_v": 2.0})
        assert state.values("tuned") == {"attn_v": 2.0}


@pytest.mark.slow  # solves (and evaluates) the demo model
def test_tune_runs_untuned_first_stores_the_best_and_resumes(solve, tmp_path):
    budgets = [Target(bits_per_weight=5.0)]
    settings = {"ctx": 64, "chunks": 1, "cache_dir": tmp_path, "progress": False}
    report = tune(solve, budgets, trials=3, **settings)
    assert len(report.trials) == 3 and report.untuned.number == 0
    assert set(report.untuned.tuning.values()) == {1.0, 0.0}  # every class factor 1, depth 0
    assert {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd"} | {
        DEPTH_KEY
    } == set(report.untuned.tuning)
    assert all(len(t.klds) == 1 and t.klds[0] > 0 and t.score == pytest.approx(math.log(t.klds[0]))
               for t in report.trials)  # fmt: skip
    assert report.best.score == min(t.score for t in report.trials) <= report.untuned.score
    assert all(t.score_stderr > 0 for t in report.trials)
    assert report.chosen is choose_trial(report.best, report.untuned)  # the rule itself: test_the_best_trial_…
    with StateFile.open(solve.state_path, read_identity(solve.state_path), create=False) as state:
        assert state.values("tuned") == pytest.approx(report.chosen.tuning)
        state.set_values("tuned", {})
    assert storage_path(solve.state_path).is_file()

    resumed = tune(solve, budgets, trials=4, **settings)
    assert [t.number for t in resumed.trials] == [0, 1, 2, 3]  # one more trial; the untuned one not run again
    assert resumed.trials[:3] == report.trials


@pytest.mark.slow  # solves (and evaluates) the demo model
def test_tune_without_a_budget_is_one_line_and_exit_1(demo_model_path, tmp_path, capsys):
    assert main(["tune", str(demo_model_path), "--state-file", str(tmp_path / "s.bpw_state")]) == 1
    assert capsys.readouterr().err.strip() == (
        "bpwopt: error: give at least one budget to tune at: --target-bpw BPW... or --target-size SIZE..."
    )


@pytest.mark.slow  # solves (and evaluates) the demo model
def test_without_an_objective_a_calibrated_state_is_solved_with_relative_error(solve):
    def solved_objective(weights: dict[str, float], objective: str | None = None) -> str:
        with StateFile.open(solve.state_path, read_identity(solve.state_path), create=False) as state:
            state.set_values("weights", weights)
        optimize_file(replace(solve, objective=objective))
        with StateFile.open(solve.state_path, read_identity(solve.state_path), create=False) as state:
            state.set_values("weights", {})
            return state.plans()[-1][1].objective

    assert solve.objective is None
    assert solved_objective({"attn_v@0-9": 2.0}) == "relative"  # sensitivities are KLD per unit relative error
    assert solved_objective({}) == "per-weight"
    assert solved_objective({"attn_v@0-9": 2.0}, "wsse") == "wsse"  # an explicit choice is kept


def _trial(number: int, score: float, stderr: float) -> TrialResult:
    return TrialResult(number, {"attn_v": 1.0 + number}, (math.exp(score),), score, stderr)


@pytest.mark.parametrize(
    ("best_score", "expected"),
    [(-2.0, "best"), (-1.26, "best"), (-1.25, "untuned"), (-1.24, "untuned"), (0.0, "untuned")],
)
def test_the_best_trial_is_kept_only_when_it_wins_by_two_combined_standard_errors(best_score, expected):
    # standard errors 0.375 and 0.5 combine to 0.625 (exact in binary, so the tie is a tie): the best must be
    # more than 1.25 below the untuned score of 0
    untuned, best = _trial(0, 0.0, 0.5), _trial(1, best_score, 0.375)
    assert choose_trial(best, untuned) is {"best": best, "untuned": untuned}[expected]
