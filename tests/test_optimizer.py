"""End to end on SmolLM2: measure once, hit targets across the whole range, survive kill -9, load in llama.cpp."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from bpwopt.cli.main import main
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.measure.measure import Sampling
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.solve.targets import Target
from bpwopt.state.store import StateFile, read_identity

pytestmark = pytest.mark.slow  # the optimizer end to end on the demo model

SAMPLE = ["--sample-rows", "64"]  # every SmolLM2 tensor sampled: a full measurement in ~20 s on 2 cores


def run_json(capsys, *arguments) -> dict:
    assert main(["--allow-requantize", "--json", *SAMPLE, *map(str, arguments)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def measured_state(demo_model_path, tmp_path_factory) -> Path:
    """A state file holding every candidate of every tensor, measured once for the whole module."""
    state = tmp_path_factory.mktemp("state") / "smollm2.bpw_state"
    argv = ["--allow-requantize", "--quiet", *SAMPLE, "--state-file", str(state), "--dry-run", "--target-bpw", "5"]
    assert main([*argv, str(demo_model_path)]) == 0
    return state


def job(model: Path, state: Path, target: Target, **changes) -> OptimizeJob:
    return OptimizeJob(
        input_path=model,
        output_path=None,
        target=target,
        options=QuantizeOptions(allow_requantize=True),
        sampling=Sampling(max_rows=64),
        state_path=state,
        dry_run=True,
        progress=False,
        **changes,
    )


def _dense_range(report) -> tuple[float, float]:
    """The bpw range where plans exist at every 0.01 bpw: below the embedding's last step.

    Near the top, everything else is already at its best type and the tied
    28M-weight embedding's step from Q5_1 to Q8_0 (0.53 bpw of the whole
    model) has nothing in between: targets there land at the step's foot,
    which is the least-error plan that fits, but more than 0.01 bpw below.
    """
    low, high = (8 * cost / report.elements for cost in report.reachable_bytes)
    return low, high - 0.6


def test_bpw_targets_land_just_below_across_the_reachable_range(demo_model_path, measured_state):
    first = optimize_file(job(demo_model_path, measured_state, Target(bits_per_weight=5)))
    low, high = _dense_range(first)
    for bpw in np.linspace(low, high, 12):
        bpw = math.ceil(bpw * 1e4) / 1e4
        report = optimize_file(job(demo_model_path, measured_state, Target(bits_per_weight=bpw)))
        assert report.measured == 0 and report.elements == first.elements
        assert bpw - 0.01 <= report.bits_per_weight <= bpw, bpw


def test_size_targets_count_the_whole_file_and_land_within_half_a_percent(demo_model_path, measured_state):
    report = optimize_file(job(demo_model_path, measured_state, Target(file_bytes=90_000_000)))
    header = report.file_bytes - sum(t.data_bytes for t in report.tensors)  # header + padding
    assert header > 0
    low, high = (bpw * report.elements / 8 + header for bpw in _dense_range(report))
    for size in np.linspace(low + 1_000_000, high, 11).astype(int):
        report = optimize_file(job(demo_model_path, measured_state, Target(file_bytes=int(size))))
        assert 0.995 * size <= report.file_bytes <= size, size


def test_unreachable_targets_name_the_reachable_range(demo_model_path, measured_state, capsys):
    for option, value in (("--target-bpw", "1.0"), ("--target-size", "10MB"), ("--target-bpw", "9")):
        argv = ["--allow-requantize", *SAMPLE, "--state-file", str(measured_state), "--dry-run", option, value]
        assert main([*argv, str(demo_model_path)]) == 1
        error = capsys.readouterr().err
        assert "reachable" in error and error.count("\n") == 1


def test_resolving_from_the_state_measures_nothing(demo_model_path, measured_state):
    # its speed is benchmarks/optimizer.py's business, not a timed test's
    report = optimize_file(job(demo_model_path, measured_state, Target(bits_per_weight=5.1234)))
    assert report.measured == 0 and report.reused > 1000 and report.gap < 1e-4


def test_presets_compared_are_the_nearest_to_the_budget_not_to_where_the_plan_landed(demo_model_path, measured_state):
    first = optimize_file(job(demo_model_path, measured_state, Target(bits_per_weight=5.5), compare_presets=True))
    above = max(first.comparisons, key=lambda c: c.bits_per_weight)
    assert above.bits_per_weight > 5.5
    # a budget of exactly that preset's size: the plan lands a little under it, the preset still fits it
    target = above.bits_per_weight + 1e-9
    report = optimize_file(job(demo_model_path, measured_state, Target(bits_per_weight=target), compare_presets=True))
    fitting = [c for c in report.comparisons if c.bits_per_weight <= target]
    assert max(fitting, key=lambda c: c.bits_per_weight).name == above.name
    assert len(fitting) == 2 and len(report.comparisons) == 3


def test_plan_beats_the_preset_at_the_same_size(demo_model_path, measured_state):
    target = Target(bits_per_weight=5.5)
    report = optimize_file(job(demo_model_path, measured_state, target, type_text="Q4_K_M", compare_presets=True))
    (comparison,) = report.comparisons
    assert comparison.name == "Q4_K_M"
    assert comparison.optimized_error <= comparison.predicted_error
    assert optimize_file(job(demo_model_path, measured_state, target, type_text="Q4_K_M")).comparisons == ()


def test_written_plan_loads_and_generates(demo_model_path, measured_state, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    summary = run_json(capsys, "--state-file", measured_state, "--target-size", "90MB", demo_model_path, out)
    assert summary["measured"] == 0 and summary["file_bytes"] == out.stat().st_size <= 90_000_000
    reader = gguf.GGUFReader(out)
    assert reader.fields["bpwopt.target"].contents() == "size<=90000000"
    model = llama_cpp.Llama(str(out), n_ctx=128, verbose=False)
    assert model("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"].strip()
    assert not list(tmp_path.glob("*.tmp"))


def test_state_of_other_settings_is_refused(demo_model_path, measured_state, capsys):
    argv = ["--allow-requantize", "--sample-rows", "32", "--state-file", str(measured_state), "--target-bpw", "6"]
    assert main([*argv, "--dry-run", str(demo_model_path)]) == 1
    assert "sampling" in capsys.readouterr().err


def test_requantizing_needs_the_flag_before_anything_is_measured(demo_model_path, tmp_path, capsys):
    assert main(["--target-bpw", "5", str(demo_model_path), str(tmp_path / "o.gguf")]) == 1
    assert "--allow-requantize" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_types_that_need_an_imatrix_are_candidates_only_with_one(demo_model_path, tmp_path, capsys):
    argv = ["--allow-requantize", "--json", *SAMPLE, "--dry-run", "--target-bpw", "6", "--state-file"]
    weighted = ["--imatrix", str(Path(__file__).resolve().parents[1] / "data" / "smollm2-135m-q4_1.imatrix.gguf")]
    candidates = ["--candidates", "IQ2_XXS,IQ3_S,Q8_0"]
    measured = {}
    for label, extra in (("plain", []), ("imat", weighted)):
        state = tmp_path / f"{label}.bpw_state"
        assert main([*argv, str(state), *candidates, *extra, str(demo_model_path)]) == 0
        with StateFile.open(state, read_identity(state), create=False) as opened:
            measured[label] = {qtype for tensor, qtype in opened.measurements() if tensor == "blk.0.ffn_down.weight"}
    assert measured == {"plain": {"IQ3_S", "Q8_0"}, "imat": {"IQ2_XXS", "IQ3_S", "Q8_0"}}  # 1536 wide: no fallback

    only = [*argv, str(tmp_path / "only.bpw_state"), "--candidates"]
    assert main([*only, "IQ2_XXS", str(demo_model_path)]) == 1
    assert "can be quantized without an importance matrix for blk.0.ffn_down.weight" in capsys.readouterr().err
    assert main([*only, "Q1_0", str(demo_model_path)]) == 1
    assert "fits the 576-wide rows of" in capsys.readouterr().err
