"""Sensitivity calibration: noise of an exact relative size, group keys, a small run, and the solver using it."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from bpwopt.formats.gguf_reader import open_gguf
from bpwopt.formats.imatrix import Imatrix
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.measure.measure import Sampling
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.quality.calibrate import (
    PROBE_OBJECTIVE,
    calibrate,
    noise_perturbation,
    probe_types,
    quant_perturbation,
    relative_error,
    scaled_noise,
    solver_weights,
    tensor_groups,
    write_perturbed,
)
from bpwopt.solve.objective import PROBE_BPW_KEY, group_key, group_weight, layer_thirds, option_errors
from bpwopt.solve.targets import Target
from bpwopt.source.rows import rows_to_float, tensor_rows
from bpwopt.state.store import StateFile, TensorRecord, read_identity
from tests.conftest import make_imatrix, make_rows

Q = gguf.GGMLQuantizationType
CANDIDATES = (Q.Q4_0, Q.Q5_0, Q.Q8_0)  # few types: the module's measurement stays fast


def record(name: str, category: str, layer: int | None) -> TensorRecord:
    return TensorRecord(name, (64, 8), 512, "F32", category, layer, 1.0, 1.0)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("target", [1e-4, 1e-3, 0.3])
def test_noise_has_exactly_the_requested_relative_error(weighted, target):
    values = make_rows("mixed_scales", 48, 256)
    weights = make_imatrix(256)[None, :] if weighted else None
    noise = scaled_noise(values, weights, target, np.random.default_rng(0))
    assert noise.dtype == np.float32 and noise.shape == values.shape
    assert relative_error(values, values.astype(np.float64) + noise, weights) == pytest.approx(target, rel=1e-6)


def test_noise_is_sized_per_expert_weights():
    values = make_rows("gaussian", 2 * 16, 64)  # two experts of 16 rows
    weights = np.stack([make_imatrix(64, seed=1), make_imatrix(64, seed=2)])
    noise = scaled_noise(values, weights, 1e-3, np.random.default_rng(1))
    signal = sum(((values[16 * e : 16 * (e + 1)].astype(np.float64) ** 2) @ weights[e]).sum() for e in range(2))
    injected = sum(((noise[16 * e : 16 * (e + 1)].astype(np.float64) ** 2) @ weights[e]).sum() for e in range(2))
    assert injected / signal == pytest.approx(1e-3, rel=1e-6)


def test_all_zero_tensor_gets_no_noise():
    values = np.zeros((4, 32), np.float32)
    assert not scaled_noise(values, None, 1e-3, np.random.default_rng(0)).any()


def test_group_keys_are_class_and_layer_third():
    assert layer_thirds(30) == [(0, 9), (10, 19), (20, 29)]
    assert layer_thirds(4) == [(0, 1), (2, 2), (3, 3)]
    assert group_key(record("blk.0.attn_v.weight", "attn_v", 0), 30) == "attn_v@0-9"
    assert group_key(record("blk.19.ffn_down.weight", "ffn_down", 19), 30) == "ffn_down@10-19"
    assert group_key(record("blk.29.attn_q.weight", "attn_q", 29), 30) == "attn_q@20-29"
    assert group_key(record("token_embd.weight", "token_embd", None), 30) == "token_embd.weight"
    assert group_key(record("blk.7.attn_v.weight", "attn_v", 7), 30, "class") == "attn_v"
    assert group_key(record("blk.7.attn_v.weight", "attn_v", 7), 30, "class-layer") == "attn_v@7"
    assert group_key(record("blk.7.attn_v.weight", "attn_v", 7), 30, "tensor") == "blk.7.attn_v.weight"
    with pytest.raises(ValueError, match="class-third"):
        group_key(record("blk.7.attn_v.weight", "attn_v", 7), 30, "depth")


def test_group_weight_prefers_the_most_specific_key():
    tensor = record("blk.12.attn_v.weight", "attn_v", 12)
    assert group_weight(tensor, {}) == 1.0
    assert group_weight(tensor, {"attn_v": 2.0}) == 2.0
    assert group_weight(tensor, {"attn_v": 2.0, "attn_v@10-19": 3.0, "attn_v@0-9": 9.0}) == 3.0
    assert group_weight(tensor, {"attn_v@10-19": 3.0, "attn_v@12": 4.0}) == 4.0
    assert group_weight(tensor, {"attn_v@12": 4.0, "blk.12.attn_v.weight": 5.0}) == 5.0
    assert group_weight(tensor, {"ffn_up@10-19": 3.0, "attn_v@1": 7.0}) == 1.0  # other class, other layer


def test_uncalibrated_groups_get_the_median_weight():
    measured = {"a": 1.0, "b": 3.0, "c": 8.0}
    assert solver_weights(measured, ["a", "b", "c", "d"]) == {"a": 1.0, "b": 3.0, "c": 8.0, "d": 3.0}


@pytest.mark.slow  # perturbs the demo model
def test_perturbed_file_has_the_relative_error_in_each_tensor(demo_model_path, tmp_path):
    reader = open_gguf(demo_model_path)
    names = ["blk.0.attn_v.weight", "blk.1.attn_v.weight"]
    weights = {name: make_imatrix(576, seed=i) for i, name in enumerate(names)}
    imatrix = Imatrix(Path("test.imatrix"), weights)
    write_perturbed(reader, names, tmp_path / "p.gguf", noise_perturbation(2e-3, seed=0), imatrix)
    written = {t.name: t for t in open_gguf(tmp_path / "p.gguf").tensors}
    for tensor in reader.tensors:
        if tensor.name in names:
            source = rows_to_float(tensor_rows(tensor), Q(tensor.tensor_type), tensor.name)
            assert written[tensor.name].tensor_type == Q.F32
            perturbed = np.asarray(written[tensor.name].data).reshape(source.shape)
            assert relative_error(source, perturbed, weights[tensor.name][None]) == pytest.approx(2e-3, rel=1e-5)
        elif tensor.name in ("blk.2.attn_v.weight", "token_embd.weight"):
            assert np.array_equal(tensor_rows(written[tensor.name]), tensor_rows(tensor))


@pytest.fixture(scope="module")
def measured_state(demo_model_path, tmp_path_factory) -> Path:
    state = tmp_path_factory.mktemp("state") / "smollm2.bpw_state"
    optimize_file(solve_job(demo_model_path, state))
    return state


def solve_job(model: Path, state: Path, **changes) -> OptimizeJob:
    return OptimizeJob(
        input_path=model, output_path=None, target=Target(bits_per_weight=5.5),
        options=QuantizeOptions(allow_requantize=True), candidates=CANDIDATES, sampling=Sampling(max_rows=64),
        state_path=state, dry_run=True, progress=False, **changes,
    )  # fmt: skip


@pytest.mark.slow  # KL divergence through llama.cpp on the demo model
def test_calibrate_two_groups_stores_positive_sensitivities(demo_model_path, measured_state, tmp_path):
    only = ["attn_v@0-9", "ffn_down@20-29"]
    report = calibrate(
        demo_model_path, measured_state, only=only, probe="noise", chunks=1, ctx=64, cache_dir=tmp_path, progress=False
    )  # fmt: skip
    assert [g.key for g in report.groups] == only
    with StateFile.open(measured_state, read_identity(measured_state), create=False) as state:
        sensitivities = state.values("sensitivities")
        weights = state.values("weights")
        records = list(state.tensors().values())
    for group in report.groups:
        assert len(group.tensors) == 10 and group.summed_error == pytest.approx(10e-3)
        assert math.isfinite(group.sensitivity) and group.sensitivity > 0
        assert sensitivities[group.key] == group.sensitivity == weights[group.key]
    groups = tensor_groups(records, 30)
    assert set(weights) == set(groups) and len(groups) == 22  # 7 classes x 3 thirds + the tied embedding
    assert sensitivities["calibration.noise"] == 1e-3 and sensitivities["calibration.chunks"] == 1

    again = calibrate(
        demo_model_path, measured_state, only=only, probe="noise", chunks=1, ctx=64, cache_dir=tmp_path, progress=False
    )  # fmt: skip
    assert all(group.reused for group in again.groups)  # resumed: nothing measured twice


@pytest.mark.slow  # measures the demo model, then perturbs it through each tensor's probe type
def test_quant_probe_perturbs_each_tensor_by_the_error_the_state_measured_for_its_probe(
    demo_model_path, measured_state, tmp_path
):
    with StateFile.open(measured_state, read_identity(measured_state), create=False) as state:
        records, measurements = state.tensors(), state.measurements()
    probes = probe_types(records, measurements)
    assert probes["blk.0.attn_v.weight"] == Q.Q4_0  # 4.5 bpw: the candidate nearest PROBE_BPW
    assert probes["token_embd.weight"] == Q.Q4_0
    names = ["blk.0.attn_v.weight", "blk.3.ffn_down.weight"]
    reader = open_gguf(demo_model_path)
    write_perturbed(reader, names, tmp_path / "p.gguf", quant_perturbation(probes, "ggml"), None)
    written = {t.name: t for t in open_gguf(tmp_path / "p.gguf").tensors}
    for tensor in reader.tensors:
        if tensor.name not in names:
            continue
        source = rows_to_float(tensor_rows(tensor), Q(tensor.tensor_type), tensor.name)
        perturbed = np.asarray(written[tensor.name].data).reshape(source.shape)
        plain = relative_error(source, perturbed, None)
        record = records[tensor.name]
        stored = measurements[tensor.name, "Q4_0"].value("sse") / record.plain_energy  # measured on 64 sampled rows
        assert plain == pytest.approx(stored, rel=0.25)
        assert option_errors(PROBE_OBJECTIVE, [measurements[tensor.name, "Q4_0"]], record)[0] > 0

    report = calibrate(
        demo_model_path, measured_state, only=["attn_v@0-9"], chunks=1, ctx=64, cache_dir=tmp_path, progress=False
    )  # fmt: skip
    (group,) = report.groups
    expected = sum(option_errors(PROBE_OBJECTIVE, [measurements[n, "Q4_0"]], records[n])[0] for n in group.tensors)
    assert group.summed_error == pytest.approx(expected) and group.sensitivity > 0
    with StateFile.open(measured_state, read_identity(measured_state), create=False) as state:
        assert state.values("sensitivities")[PROBE_BPW_KEY] == 4.5


@pytest.mark.slow  # measures and solves the demo model
def test_raising_a_group_weight_gives_its_tensors_more_bits(demo_model_path, measured_state):
    def group_bytes(weights: dict[str, float]) -> int:
        with StateFile.open(measured_state, read_identity(measured_state), create=False) as state:
            state.set_values("weights", weights)
        report = optimize_file(solve_job(demo_model_path, measured_state))
        return sum(t.data_bytes for t in report.tensors if t.category == "ffn_down" and int(t.name.split(".")[1]) < 10)

    plain = group_bytes({})
    raised = group_bytes({"ffn_down@0-9": 1000.0})
    assert raised > plain
