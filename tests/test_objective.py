"""The objectives: what one tensor's measured errors become before the solver adds them up."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from bpwopt.errors import BpwoptError
from bpwopt.measure.records import Estimate, Measurement, TensorRecord
from bpwopt.solve.objective import PROBE_BPW_KEY, REGISTRY, default_objective, get_objective, option_errors

RECORD = TensorRecord("blk.3.ffn_down.weight", (1536, 576), 884_736, "F16", "ffn_down", 3, 50.0, 40.0)


def measurement(tensor: str, qtype: str, nbytes: int, weighted: float, plain: float, rows: int = 8) -> Measurement:
    statistics = {"weighted_sse": Estimate(weighted, 0.0), "sse": Estimate(plain, 0.0)}
    return Measurement(tensor, qtype, nbytes, statistics, rows, rows, 0.1)


def measured(*weighted_sse: float) -> list[Measurement]:
    return [measurement(RECORD.name, f"T{i}", 100 * (i + 1), e, 2 * e) for i, e in enumerate(weighted_sse)]


# measured(e): weighted error e, plain error 2e; RECORD: weighted signal 50, plain signal 40, 884,736 weights
@pytest.mark.parametrize(
    ("objective", "scale"),
    [("wsse", 1.0), ("relative", 1 / 50.0), ("per-weight", 884_736 * (1 / 50.0 + 2 / 40.0) / 2)],
)
def test_each_objective_scales_the_error_and_the_group_weight_multiplies_it(objective, scale):
    errors = option_errors(objective, measured(4.0, 1.0, 0.0), RECORD, weight=3.0)
    assert errors.dtype == np.float64
    assert errors.tolist() == pytest.approx([3.0 * 4.0 * scale, 3.0 * scale, 0.0])


def test_per_weight_does_not_let_one_huge_imatrix_channel_make_a_tensor_look_free():
    # blk.11.ffn_down of SmolLM2: 90 % of its imatrix in one channel, Q2_K's weighted relative error 2e-4
    # against a plain relative error of 8e-2; the plain half keeps it near the 4e-2 an ordinary tensor shows
    skewed = TensorRecord("blk.11.ffn_down.weight", (1536, 576), 884_736, "F16", "ffn_down", 11, 1.0, 1.0)
    q2_k = measurement(skewed.name, "Q2_K", 290_304, 2e-4, 8e-2, rows=576)
    assert option_errors("relative", [q2_k], skewed).tolist() == pytest.approx([2e-4])
    assert option_errors("per-weight", [q2_k], skewed).tolist() == pytest.approx([884_736 * 0.5 * (2e-4 + 8e-2)])


def test_a_tensor_of_zero_signal_has_no_relative_error():
    silent = TensorRecord("blk.0.attn_k.weight", (576, 192), 110_592, "F16", "attn_k", 0, 0.0, 0.0)
    assert option_errors("per-weight", measured(1.0), silent).tolist() == [0.0]


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf])
def test_an_unusable_stored_error_or_weight_is_a_damaged_state(bad):
    with pytest.raises(BpwoptError, match="the state file is damaged"):
        option_errors("wsse", measured(1.0, bad), RECORD)
    with pytest.raises(BpwoptError, match="the state file is damaged"):
        option_errors("relative", measured(1.0), RECORD, weight=bad)


def test_an_unknown_objective_names_the_registered_ones_and_the_default_depends_on_calibration():
    with pytest.raises(ValueError, match="valid: wsse, relative, per-weight"):
        get_objective("mse")
    assert default_objective({}, {}) == "per-weight"
    assert default_objective({"attn_v@0-9": 2.0}, {PROBE_BPW_KEY: 0.0}) == "relative"  # noise probes
    assert default_objective({"attn_v@0-9": 2.0}, {PROBE_BPW_KEY: 4.5}) == "per-weight"  # quantization probes


# measured(4.0) on RECORD: weighted error 4, plain error 8; signals 50 (weighted) and 40 (plain), 884,736 weights
@pytest.mark.parametrize(
    ("name", "expected"),
    [("wsse", 4.0), ("relative", 0.08), ("per-weight", 123_863.04)],  # 4/50; 884,736 × (0.08 + 0.2) / 2
)
def test_an_objective_reads_only_the_statistics_it_declares(name, expected):
    declared = REGISTRY[name].statistics
    # a statistic no objective declares, unusable: read by mistake, it would make the result NaN (a damaged state)
    poisoned = [replace(m, statistics={**m.statistics, "unread": Estimate(math.nan, 0.0)}) for m in measured(4.0)]
    only_declared = [replace(m, statistics={s: m.statistics[s] for s in declared}) for m in poisoned]
    assert option_errors(name, poisoned, RECORD).tolist() == pytest.approx([expected])
    assert option_errors(name, only_declared, RECORD).tolist() == pytest.approx([expected])
    for lacking in declared:
        partial = [replace(m, statistics={s: e for s, e in m.statistics.items() if s != lacking}) for m in poisoned]
        with pytest.raises(BpwoptError, match=f"no {lacking} for it; measure it again"):
            option_errors(name, partial, RECORD)
