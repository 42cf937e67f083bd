"""Measurement: candidate sets, the row sample and its error bar, and errors equal to the kernels'."""

from __future__ import annotations

import pickle
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from multiprocessing import get_context
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st

import bpwopt
from bpwopt.demo import smollm2_path
from bpwopt.errors import BpwoptError
from bpwopt.formats.gguf_reader import open_gguf
from bpwopt.measure import backends
from bpwopt.measure.measure import (
    DEFAULT_CANDIDATES,
    Sampling,
    TensorTask,
    candidate_types,
    estimate_ratio,
    estimate_total,
    measure_tensor,
    measure_tensors,
    sample_order,
)
from bpwopt.quant.types import get_quant_type
from bpwopt.source.rows import release_pages, tensor_rows


def test_row_length_of_256_takes_every_candidate():
    assert set(candidate_types(1536, DEFAULT_CANDIDATES)) == set(DEFAULT_CANDIDATES)


def test_row_length_576_takes_llama_cpps_fallbacks_smallest_first():
    # SmolLM2's width: K-quants and i-quants fall back to IQ4_NL, Q4_0, Q5_0, Q5_1, Q8_0 as in llama.cpp; Q1_0 has none
    fitted = (Q.Q2_0, Q.MXFP4, Q.IQ4_NL, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
    assert candidate_types(576, DEFAULT_CANDIDATES) == fitted


def test_row_length_not_a_multiple_of_32_falls_back_to_f16():
    assert candidate_types(100, [Q.Q4_K, Q.Q8_0]) == (Q.F16,)


def test_a_candidate_without_a_fallback_is_left_out_where_its_block_does_not_fit():
    # Q1_0's blocks are 128 wide and llama.cpp defines no fallback for it; the i-quants fall back to IQ4_NL
    assert candidate_types(576, [Q.Q1_0, Q.IQ2_XXS, Q.TQ1_0]) == (Q.IQ4_NL, Q.Q4_0)
    assert candidate_types(640, [Q.Q1_0, Q.MXFP4]) == (Q.Q1_0, Q.MXFP4)


def _largest(n_rows: int, sampling: Sampling, name: str = "t"):
    """The last (largest) round's sample of a tensor with n_rows rows."""
    order = sample_order(n_rows, sampling, name)
    return order.first(order.per_stratum[-1])


def test_tensors_no_larger_than_the_first_round_are_measured_whole():
    order = sample_order(50, Sampling(), "blk.0.attn_q.weight")
    assert order.per_stratum == (50,)
    sample = order.first(50)
    assert sample.complete and np.array_equal(sample.rows, np.arange(50))


def test_first_round_is_stratified_deterministic_and_named():
    sampling = Sampling(seed=3)
    first = sample_order(10_000, sampling, "token_embd.weight").first(2)
    assert not first.complete and first.rows.size == 64
    assert np.array_equal(first.rows, sample_order(10_000, sampling, "token_embd.weight").first(2).rows)
    assert not np.array_equal(first.rows, sample_order(10_000, sampling, "output.weight").first(2).rows)
    # two rows from each of 32 equal strata: every part of the tensor is represented
    assert np.array_equal(np.bincount(first.rows * 32 // 10_000, minlength=32), np.full(32, 2))


def test_rounds_double_and_each_contains_the_last():
    # a round reads only the rows it adds: each sample is a prefix of the next
    order = sample_order(10_000, Sampling(max_rows=1024), "t")
    samples = list(order.rounds())
    assert [s.rows.size for s in samples] == [64, 128, 256, 512, 1024]
    for smaller, larger in pairwise(samples):
        assert np.array_equal(larger.rows[: smaller.rows.size], smaller.rows)
    assert len(set(samples[-1].rows.tolist())) == 1024 and not samples[-1].complete


def test_the_last_round_is_every_row_where_the_cap_allows():
    samples = list(sample_order(576, Sampling(max_rows=1024), "t").rounds())
    assert [s.rows.size for s in samples] == [64, 128, 256, 512, 576] and samples[-1].complete
    assert np.array_equal(np.sort(samples[-1].rows), np.arange(576))


def test_strata_follow_the_rows_energies_and_a_heavy_row_stands_alone():
    # one row with 90 % of the energy is measured in every round; the others share 31 strata of equal energy
    energy = np.random.default_rng(0).gamma(2.0, 1.0, 5000)
    energy[1234] = 9 * energy.sum()
    order = sample_order(5000, Sampling(), "t", energy)
    first = order.first(2)
    assert 1234 in first.rows and first.rows.size == 63
    heavy_stratum = first.strata[first.rows == 1234][0]
    assert order.stratum_sizes[heavy_stratum] == 1
    assert all(1234 in sample.rows for sample in order.rounds())
    # equal shares of energy: the strata of light rows hold many more rows than those of heavy ones
    light = np.delete(order.stratum_sizes, heavy_stratum)
    assert light[0] > 3 * light[-1] and light.sum() == 4999


def test_an_outlier_row_is_not_missed():
    # the ratio over a sample that missed a row holding most of the energy would be far off; here it is exact
    energy = np.ones(1000)
    energy[7] = 1000.0
    errors = 0.01 * energy
    errors[7] = 0.0  # the heavy row errs nothing (it sets its blocks' scales)
    for sample in sample_order(1000, Sampling(), "t", energy).rounds():
        estimate = estimate_ratio(errors[sample.rows], energy[sample.rows], sample)
        assert estimate.value == pytest.approx(errors.sum() / energy.sum(), rel=1e-9)


def test_precise_measures_every_row():
    assert sample_order(10_000, Sampling(max_rows=64, precise=True), "t").first(10_000).complete


@pytest.mark.parametrize("rse", [-0.1, 1.0, float("nan")])
def test_a_relative_standard_error_outside_0_to_1_is_refused(rse):
    with pytest.raises(BpwoptError, match="--sample-rse"):
        Sampling(rse=rse)


@settings(max_examples=30, deadline=None)
@given(n_rows=st.integers(200, 5000), max_rows=st.integers(2, 150), value=st.floats(0, 1e6))
def test_estimate_is_exact_when_rows_are_alike(n_rows, max_rows, value):
    sample = _largest(n_rows, Sampling(max_rows=max_rows))
    total, stderr = estimate_total(np.full(sample.rows.size, value), sample)
    assert total == pytest.approx(value * n_rows, rel=1e-12) and stderr == pytest.approx(0, abs=1e-6 * (value + 1))


def test_estimate_is_unbiased_and_its_error_bar_honest():
    per_row_all = np.random.default_rng(0).gamma(2.0, 1.0, 20_000)
    truth = per_row_all.sum()
    estimates, bars = [], []
    for seed in range(300):
        sample = _largest(per_row_all.size, Sampling(max_rows=256, seed=seed))
        total, stderr = estimate_total(per_row_all[sample.rows], sample)
        estimates.append(total)
        bars.append(stderr)
    estimates, bars = np.array(estimates), np.array(bars)
    assert abs(estimates.mean() - truth) < 3 * estimates.std() / np.sqrt(len(estimates))
    assert estimates.std() == pytest.approx(bars.mean(), rel=0.15)
    assert 0.9 < np.mean(np.abs(estimates - truth) < 2 * bars) < 0.99


def test_error_bar_shrinks_with_the_sample():
    per_row_all = np.random.default_rng(0).gamma(2.0, 1.0, 100_000)
    bars = []
    for sample in sample_order(per_row_all.size, Sampling(max_rows=16384), "t").rounds():
        bars.append(estimate_total(per_row_all[sample.rows], sample)[1])
    assert all(a > b for a, b in pairwise(bars))


@pytest.fixture(scope="module")
def demo_reader(demo_model_path):
    return gguf.GGUFReader(demo_model_path)


def _tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def _task(model_path, name: str, types: tuple[str, ...], weights=None, **changes) -> TensorTask:
    fields = dict(model_path=str(model_path), tensor=name, category="ffn_down", types=types, weights=weights,
                  sampling=Sampling(max_rows=64), needs_record=True, work=1536 * 576)  # fmt: skip
    return TensorTask(**{**fields, **changes})


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.IQ4_NL, Q.Q6_K])
def test_whole_tensor_measurement_equals_the_kernels_error(demo_model_path, demo_reader, qtype):
    tensor = _tensor(demo_reader, "blk.3.ffn_down.weight")
    weights = np.random.default_rng(0).random((1, 1536)).astype(np.float32)
    task = _task(demo_model_path, tensor.name, (qtype.name,), weights, sampling=Sampling(precise=True))
    (measurement,) = measure_tensor(task).measurements
    values = bpwopt.dequantize(np.asarray(tensor_rows(tensor)), Q.Q4_1)
    expected = bpwopt.quant_error(values, qtype, weights[0])
    assert (measurement.value("weighted_sse"), measurement.value("sse")) == pytest.approx(expected, rel=1e-12)
    assert measurement.statistics["weighted_sse"].stderr == 0 and measurement.rows_measured == 576
    assert measurement.nbytes == 576 * get_quant_type(qtype).row_bytes(1536)


def test_sampled_embedding_estimate_is_close_to_the_whole(demo_model_path):
    sampled, whole = (
        measure_tensor(_task(demo_model_path, "token_embd.weight", ("Q4_0",), sampling=sampling)).measurements[0]
        for sampling in (Sampling(max_rows=2048, rse=0), Sampling(precise=True))
    )
    assert sampled.rows_measured == 2048 and whole.rows_measured == whole.rows_total == 49152
    estimate, exact = sampled.statistics["sse"], whole.statistics["sse"]
    assert abs(estimate.value - exact.value) < 4 * estimate.stderr
    assert estimate.stderr < 0.05 * estimate.value


def test_a_sample_grows_until_its_error_bar_is_small_enough(demo_model_path):
    # blk.3.ffn_down has 576 rows: measured on 64 of them when 50 % is enough, on all when only exact is
    def measured(rse):
        task = _task(demo_model_path, "blk.3.ffn_down.weight", ("Q4_K", "Q8_0"), sampling=Sampling(rse=rse))
        return measure_tensor(task).measurements

    assert [m.rows_measured for m in measured(0.5)] == [64, 64]
    assert [m.rows_measured for m in measured(0.0)] == [576, 576]
    for m in measured(0.01):
        errors = m.statistics.values()
        assert all(e.stderr <= 0.01 * e.value for e in errors) and m.rows_measured < 576
        assert not all(e.stderr <= 0.01 * e.value for e in measured(0.5)[0].statistics.values())


def test_a_dominated_type_stops_at_a_small_sample(demo_model_path):
    # IQ4_NL is Q4_0's size and errs ~20 % less: however precise the rest, Q4_0 need not be
    task = _task(demo_model_path, "blk.3.ffn_down.weight", ("IQ4_NL", "Q4_0"), sampling=Sampling(rse=0.001))
    result = measure_tensor(task)
    nl, q4 = result.measurements
    assert result.dominated == ("Q4_0",) and q4.rows_measured == 64 and nl.rows_measured > 64
    assert q4.value("sse") > nl.value("sse") and q4.value("weighted_sse") > nl.value("weighted_sse")


def test_source_type_costs_nothing(demo_model_path):
    # the write stage copies a tensor whose target is its source type: it adds no error
    (measurement,) = measure_tensor(_task(demo_model_path, "blk.0.attn_q.weight", ("Q4_1",))).measurements
    assert measurement.value("sse") == 0 and measurement.value("weighted_sse") == 0


def test_a_task_is_plain_data_and_measures_as_in_this_process(demo_model_path, demo_reader):
    tensor = _tensor(demo_reader, "blk.3.ffn_down.weight")
    weights = np.random.default_rng(1).random((1, 1536)).astype(np.float32)
    task = _task(demo_model_path, tensor.name, ("Q4_K", "Q8_0"), weights)
    result = pickle.loads(pickle.dumps(measure_tensor(pickle.loads(pickle.dumps(task)))))
    assert result.tensor == tensor.name and [m.qtype for m in result.measurements] == ["Q4_K", "Q8_0"]
    here = measure_tensor(task)
    assert [m.statistics for m in result.measurements] == [m.statistics for m in here.measurements]
    assert result.record == here.record
    record = result.record
    assert (record.name, record.shape, record.category, record.layer) == (tensor.name, (1536, 576), "ffn_down", 3)
    assert (record.elements, record.source_type) == (1536 * 576, "Q4_1")
    assert measure_tensor(_task(demo_model_path, tensor.name, (), needs_record=False)).record is None


def test_a_task_of_a_tensor_the_model_lacks_is_a_clear_error(demo_model_path):
    with pytest.raises(BpwoptError, match=r"has no tensor blk\.99\.ffn_down\.weight"):
        measure_tensor(_task(demo_model_path, "blk.99.ffn_down.weight", ("Q8_0",)))


class _ProcessPool:
    """An executor of another kind: a pool of fresh (spawned) processes, as a cluster's workers would be."""

    def map(self, function, tasks):
        with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
            yield from pool.map(function, tasks)


@pytest.mark.slow  # two fresh Python processes import numba
def test_tasks_run_in_other_processes_give_the_same_results(demo_model_path):
    tasks = [_task(demo_model_path, f"blk.{layer}.ffn_down.weight", ("Q4_0", "Q5_1")) for layer in (0, 5)]
    here, there = [], []
    measure_tensors(tasks, here.append, progress=False)
    measure_tensors(tasks, there.append, executor=_ProcessPool(), progress=False)
    key = {result.tensor: result for result in there}
    assert len(here) == len(there) == 2
    for result in here:
        assert result.record == key[result.tensor].record
        assert [m.statistics for m in result.measurements] == [m.statistics for m in key[result.tensor].measurements]


def test_a_registered_backend_computes_the_errors(demo_model_path, monkeypatch):
    calls = []

    class Counting:
        def row_errors(self, rows, qtype, weights, rounding):
            calls.append((qtype.name, rounding))
            return np.full(rows.shape[0], 2.0), np.full(rows.shape[0], 1.0)

    monkeypatch.setitem(backends.BACKENDS, "counting", Counting())
    task = _task(demo_model_path, "blk.0.ffn_down.weight", ("Q4_0", "Q8_0"), backend="counting",
                 sampling=Sampling(precise=True))  # fmt: skip
    result = measure_tensor(task)
    assert calls == [("Q4_0", "ggml"), ("Q8_0", "ggml")]
    # 2 per row, over the tensor's 576 rows
    assert [m.value("weighted_sse") for m in result.measurements] == pytest.approx([2.0 * 576] * 2)



def _file_pages_resident_kib() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["RssFile"].split()[0])


def test_a_read_tensor_leaves_the_resident_set_and_reads_the_same_again():
    """Reading a model tensor by tensor must not keep the whole mapped file resident (the scale benchmark's RSS)."""
    tensor = next(t for t in open_gguf(smollm2_path()).tensors if t.name == "token_embd.weight")  # 15.9 MB
    release_pages(tensor)  # other tests of this process may have read it already
    before = _file_pages_resident_kib()
    checksum = tensor_rows(tensor).sum(dtype=np.uint64)
    touched = _file_pages_resident_kib()
    release_pages(tensor)
    released = _file_pages_resident_kib()
    tensor_kib = tensor.n_bytes / 1024
    assert touched - before > 0.9 * tensor_kib and touched - released > 0.9 * tensor_kib
    assert tensor_rows(tensor).sum(dtype=np.uint64) == checksum
