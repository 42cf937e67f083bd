"""The evaluation side: real texts, KL divergence through llama.cpp, base-logit cache, off-grid testbed.

Evaluations run with short windows (ctx 128, 2 chunks, 126 scored tokens) to
stay fast; the quantized models are bpwopt's own Q8_0 / Q4_0 of the off-grid
F16 copy of the demo model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

from bpwopt.errors import BpwoptError
from bpwopt.formats.gguf_writer import TensorSlot, copied_kv, encode_kv, write_gguf
from bpwopt.formats.imatrix import check_imatrix_fits, load_imatrix
from bpwopt.jobs.quantize import QuantizeJob, quantize_file
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.quality import evaluate as evaluate_module
from bpwopt.quality.evaluate import evaluate
from bpwopt.quality.testbed import BLOCK_STEPS, grid_steps, make_off_grid
from bpwopt.quality.texts import calibration_text, evaluation_text
from bpwopt.source.rows import rows_to_float, tensor_rows
from tests.conftest import save_gguf

FAST = {"ctx": 128, "chunks": 2, "threads": 1, "progress": False}  # one thread: robust on a shared CPU


@pytest.fixture(scope="module")
def off_grid_path(demo_model_path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("offgrid") / "smollm2-offgrid-f16.gguf"
    make_off_grid(demo_model_path, path, seed=0)
    return path


def _quantized(source: Path, type_name: str) -> Path:
    output = source.with_name(f"{source.stem}-{type_name}.gguf")
    if not output.exists():
        job = QuantizeJob(source, output, type_name, QuantizeOptions(allow_requantize=True), progress=False)
        quantize_file(job)
    return output


@pytest.fixture(scope="module")
def source_reader(demo_model_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(demo_model_path)


@pytest.fixture(scope="module")
def off_grid_reader(off_grid_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(off_grid_path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# --- texts -------------------------------------------------------------------------------------------


def test_texts_are_real_english_of_the_promised_size():
    for text in (calibration_text(), evaluation_text()):
        assert 60_000 <= len(text.encode("utf-8")) <= 200_000
        words = text.lower().split()
        assert len(words) > 10_000
        assert words.count("the") / len(words) > 0.03  # English prose, not word lists or code
    # fixed texts: a change would silently redefine every KLD, sensitivity and imatrix measured on them so far
    assert hashlib.sha256(calibration_text().encode()).hexdigest().startswith("6641401dfa820192")
    assert hashlib.sha256(evaluation_text().encode()).hexdigest().startswith("305a001b12b5782b")


def test_calibration_and_evaluation_texts_share_no_200_character_window():
    calibration, evaluation = calibration_text(), evaluation_text()
    windows = {calibration[i : i + 200] for i in range(len(calibration) - 199)}
    assert not any(evaluation[i : i + 200] in windows for i in range(len(evaluation) - 199))


# --- KL divergence ------------------------------------------------------------------------------------


@pytest.mark.slow  # KL divergence through llama.cpp
def test_a_model_against_itself_has_zero_kld_and_equal_perplexity(off_grid_path, cache_dir):
    result = evaluate(off_grid_path, off_grid_path, evaluation_text(), cache_dir=cache_dir, **FAST)
    assert result.tokens == 2 * (128 - 1 - 64)
    assert result.chunks == 2
    assert abs(result.mean_kld) < 1e-5  # only the float16 rounding of the cached base log-probs
    assert result.max_kld < 1e-4
    assert result.same_top_rate == 1.0
    assert result.ppl_quant == pytest.approx(result.ppl_base, rel=1e-5)
    assert 5 < result.ppl_base < 200


@pytest.mark.slow  # KL divergence through llama.cpp
def test_q8_0_has_small_positive_kld_and_q4_0_a_larger_one(off_grid_path, cache_dir):
    q8 = evaluate(off_grid_path, _quantized(off_grid_path, "Q8_0"), evaluation_text(), cache_dir=cache_dir, **FAST)
    q4 = evaluate(off_grid_path, _quantized(off_grid_path, "Q4_0"), evaluation_text(), cache_dir=cache_dir, **FAST)
    assert 0 < q8.mean_kld < 0.05
    assert q4.mean_kld > 5 * q8.mean_kld
    assert q4.p99_kld > q4.median_kld > 0
    assert q4.max_kld >= q4.p99_kld
    assert q8.same_top_rate > q4.same_top_rate
    assert q4.ppl_quant > q4.ppl_base
    assert q8.ppl_base == q4.ppl_base  # the same cached base


@pytest.mark.slow  # KL divergence through llama.cpp
def test_second_evaluation_reads_the_base_from_the_cache(off_grid_path, tmp_path, monkeypatch):
    quant = _quantized(off_grid_path, "Q8_0")
    first = evaluate(off_grid_path, quant, evaluation_text(), cache_dir=tmp_path, **FAST)
    (entry,) = tmp_path.glob("base-*.npz")
    assert entry.stat().st_size > 2 * 63 * 49152 * 2  # float16 log-probs of every scored token
    assert not list(tmp_path.glob("*.tmp"))

    def base_must_not_run(*args, **kwargs):
        raise AssertionError("the base model was evaluated again")

    monkeypatch.setattr(evaluate_module, "_evaluate_base", base_must_not_run)
    second = evaluate(off_grid_path, quant, evaluation_text(), cache_dir=tmp_path, **FAST)
    assert (first.base_from_cache, second.base_from_cache) == (False, True)
    assert second.mean_kld == first.mean_kld
    np.testing.assert_array_equal(second.kld_per_token, first.kld_per_token)


@pytest.mark.slow  # KL divergence through llama.cpp
def test_a_corrupt_cache_entry_is_recomputed(off_grid_path, tmp_path):
    evaluate(off_grid_path, off_grid_path, evaluation_text(), cache_dir=tmp_path, **FAST)
    (entry,) = tmp_path.glob("base-*.npz")
    entry.write_bytes(entry.read_bytes()[:1000])
    result = evaluate(off_grid_path, off_grid_path, evaluation_text(), cache_dir=tmp_path, **FAST)
    assert not result.base_from_cache
    assert entry.stat().st_size > 1000


def test_default_chunks_keep_the_cache_under_its_budget():
    assert evaluate_module.default_chunks(512, 49152, available=72) == 8
    assert evaluate_module.default_chunks(512, 49152, available=3) == 3
    assert evaluate_module.default_chunks(512, 256_000, available=72) == evaluate_module.MIN_DEFAULT_CHUNKS


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.slow  # its model is the off-grid copy of the demo model
def test_missing_files_short_texts_and_bad_settings_are_one_line_errors(off_grid_path, tmp_path):
    cases = [
        (lambda: evaluate(tmp_path / "absent.gguf", off_grid_path, evaluation_text()), "no such file"),
        (lambda: evaluate(off_grid_path, off_grid_path, "Too short.", cache_dir=tmp_path, **FAST), "too short"),
        (lambda: evaluate(off_grid_path, off_grid_path, evaluation_text(), ctx=4), "ctx"),
        (lambda: evaluate(off_grid_path, off_grid_path, evaluation_text(), chunks=0), "chunks"),
    ]
    for call, words in cases:
        with pytest.raises(BpwoptError, match=words) as caught:
            call()
        assert "\n" not in str(caught.value)


@pytest.mark.slow  # loads the off-grid demo model in llama.cpp
def test_a_file_llama_cpp_cannot_load_is_a_one_line_error(off_grid_path, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(BpwoptError, match="cannot load"):
        evaluate(off_grid_path, garbage, evaluation_text(), cache_dir=tmp_path, **FAST)


def _with_swapped_tokens(source: Path, output: Path, first: str, second: str) -> Path:
    """A copy of source whose vocabulary has two token strings exchanged: same size, other ids."""
    reader = gguf.GGUFReader(source)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    i, j = tokens.index(first), tokens.index(second)
    tokens[i], tokens[j] = tokens[j], tokens[i]
    entries = [
        copied_kv(field)
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.") and name != "tokenizer.ggml.tokens"
    ]
    entries.append(encode_kv("tokenizer.ggml.tokens", GGUFValueType.ARRAY, tokens, GGUFValueType.STRING))
    slots = [TensorSlot(t.name, tuple(int(n) for n in t.shape), t.tensor_type, int(t.n_bytes)) for t in reader.tensors]
    write_gguf(output, entries, slots, lambda index: [tensor_rows(reader.tensors[index])])
    return output


@pytest.mark.slow  # loads the demo model in llama.cpp
def test_a_model_with_another_vocabulary_is_refused(demo_model_path, tmp_path):
    other = _with_swapped_tokens(demo_model_path, tmp_path / "other-vocab.gguf", "Ġthe", "Ġand")
    with pytest.raises(BpwoptError, match="tokenizes the text differently"):
        evaluate(demo_model_path, other, evaluation_text(), cache_dir=tmp_path, **FAST)


# --- off-grid testbed ---------------------------------------------------------------------------------


@pytest.mark.slow  # an off-grid copy of the whole demo model
def test_off_grid_weights_stay_within_half_a_step_of_the_source(source_reader, off_grid_reader):
    source, off_grid = source_reader, off_grid_reader
    assert int(off_grid.fields["general.file_type"].contents()) == 1
    for name, field in source.fields.items():
        if not name.startswith("GGUF.") and name != "general.file_type":
            assert off_grid.fields[name].contents() == field.contents(), name
    moved = {tensor.name: tensor for tensor in off_grid.tensors}
    for tensor in source.tensors:
        out = moved[tensor.name]
        if tensor.tensor_type == GGMLQuantizationType.F32:
            assert out.tensor_type == GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(out.data), np.asarray(tensor.data))
            continue
        assert out.tensor_type == GGMLQuantizationType.F16
        raw = tensor_rows(tensor)[:64]  # the first rows of every tensor: enough, and fast
        before = rows_to_float(raw, tensor.tensor_type, tensor.name)
        after = np.asarray(out.data)[:64].astype(np.float32).reshape(before.shape)
        half_ulp = np.abs(after) * 2.0**-11  # the rounding to float16
        assert (np.abs(after - before) <= grid_steps(raw, tensor.tensor_type) / 2 + half_ulp + 1e-12).all()
        assert np.mean(after == before) < 0.01, tensor.name


@pytest.mark.slow  # an off-grid copy of the whole demo model
def test_off_grid_weights_are_not_on_the_source_grid(source_reader, off_grid_reader):
    name = "blk.3.ffn_up.weight"
    source = next(t for t in source_reader.tensors if t.name == name)
    moved = next(t for t in off_grid_reader.tensors if t.name == name)
    before = rows_to_float(tensor_rows(source), source.tensor_type, source.name)
    after = np.asarray(moved.data).astype(np.float32).reshape(before.shape)

    def q4_1_roundtrip_error(x: np.ndarray) -> float:
        y = gguf.quants.dequantize(gguf.quants.quantize(x, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
        return float(np.mean((x - y) ** 2))

    assert q4_1_roundtrip_error(after) > 100 * q4_1_roundtrip_error(before)


def _tiny_quantized_gguf(path: Path, tensor_type: GGMLQuantizationType = GGMLQuantizationType.Q4_1) -> Path:
    """A three-tensor GGUF: a quantized matrix, a Q8_0 matrix and an F32 norm."""
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_file_type(3)
    for name, ggml_type in (("blk.0.ffn_up.weight", tensor_type), ("token_embd.weight", GGMLQuantizationType.Q8_0)):
        floats = rng.standard_normal((16, 64)).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(floats, ggml_type), raw_dtype=ggml_type)
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float32))
    save_gguf(writer)
    return path


def test_off_grid_is_deterministic_in_its_seed(tmp_path):
    source = _tiny_quantized_gguf(tmp_path / "tiny.gguf")
    outputs = [tmp_path / f"{name}.gguf" for name in ("seed0", "seed0-again", "seed1")]
    for output, seed in zip(outputs, (0, 0, 1), strict=True):
        make_off_grid(source, output, seed=seed)
    first, again, other = (path.read_bytes() for path in outputs)
    assert first == again
    assert first != other


def test_a_smaller_spread_keeps_weights_closer_to_the_grid(tmp_path):
    source = _tiny_quantized_gguf(tmp_path / "tiny.gguf")
    make_off_grid(source, tmp_path / "half.gguf", out_type="F32", spread=0.5)
    tensor = next(t for t in gguf.GGUFReader(source).tensors if t.name == "blk.0.ffn_up.weight")
    moved = next(t for t in gguf.GGUFReader(tmp_path / "half.gguf").tensors if t.name == tensor.name)
    before = rows_to_float(tensor_rows(tensor), tensor.tensor_type, tensor.name)
    distance = np.abs(np.asarray(moved.data).reshape(before.shape) - before)
    step = grid_steps(tensor_rows(tensor), tensor.tensor_type)
    assert (distance <= step / 4 + 1e-6).all()
    assert distance.max() > step.max() / 8
    with pytest.raises(BpwoptError, match="spread"):
        make_off_grid(source, tmp_path / "bad.gguf", spread=0)


def test_off_grid_writes_f32_when_asked(tmp_path):
    source = _tiny_quantized_gguf(tmp_path / "tiny.gguf")
    make_off_grid(source, tmp_path / "f32.gguf", out_type="F32")
    reader = gguf.GGUFReader(tmp_path / "f32.gguf")
    assert int(reader.fields["general.file_type"].contents()) == 0
    assert {t.tensor_type for t in reader.tensors} == {GGMLQuantizationType.F32}


_F16_FIELDS = {  # byte offsets of each type's float16 scales in a block, set to finite values below
    GGMLQuantizationType.Q4_0: [0], GGMLQuantizationType.Q4_1: [0, 2], GGMLQuantizationType.Q5_0: [0],
    GGMLQuantizationType.Q5_1: [0, 2], GGMLQuantizationType.Q8_0: [0], GGMLQuantizationType.Q2_K: [80, 82],
    GGMLQuantizationType.Q3_K: [108], GGMLQuantizationType.Q4_K: [0, 2], GGMLQuantizationType.Q5_K: [0, 2],
    GGMLQuantizationType.Q6_K: [208],
}  # fmt: skip


@pytest.mark.parametrize("source_type", list(BLOCK_STEPS), ids=lambda t: t.name)
def test_grid_steps_are_the_spacing_of_each_types_grid(source_type):
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[source_type]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(64, block_bytes), dtype=np.uint8)
    for offset in _F16_FIELDS[source_type]:
        scales = rng.uniform(0.001, 0.01, size=64).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(64, 2)
    values = gguf.quants.dequantize(blocks, source_type).reshape(64, block_size).astype(np.float64)
    steps = grid_steps(blocks, source_type).astype(np.float64)
    sub_block = 16 if source_type in (GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K,
                                      GGMLQuantizationType.Q6_K) else 32  # fmt: skip
    values, steps = values.reshape(-1, sub_block), steps.reshape(-1, sub_block)
    assert (steps == steps[:, :1]).all()
    usable = steps[:, 0] > 0
    levels = (values[usable] - values[usable].min(axis=1, keepdims=True)) / steps[usable, :1]
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # every value is on the step grid…
    gcd = np.gcd.reduce(np.round(levels).astype(np.int64), axis=1)
    assert np.mean(gcd == 1) > 0.9  # …and the step is not a multiple of the true one


def test_off_grid_refuses_types_it_cannot_handle(tmp_path):
    with pytest.raises(BpwoptError, match="IQ4_NL"):
        grid_steps(np.zeros((1, 18), np.uint8), GGMLQuantizationType.IQ4_NL)
    source = _tiny_quantized_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(BpwoptError, match="F16 or F32"):
        make_off_grid(source, tmp_path / "x.gguf", out_type="Q4_0")
    with pytest.raises(BpwoptError, match="no such file"):
        make_off_grid(tmp_path / "absent.gguf", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


# --- shipped importance matrices ----------------------------------------------------------------------

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.mark.slow  # reads the whole demo model (about 4 s)
@pytest.mark.parametrize("name", ["smollm2-135m-q4_1.imatrix.gguf", "smollm2-135m-offgrid-f16.imatrix.gguf"])
def test_shipped_imatrices_are_small_and_fit_the_demo_model(name, source_reader):
    path = DATA / name
    assert path.stat().st_size < 2 << 20
    imatrix = load_imatrix(path)
    check_imatrix_fits(imatrix, {tensor.name for tensor in source_reader.tensors})
    assert imatrix.datasets == ["bpwopt-calibration-lee_background.txt"]
    assert imatrix.chunk_count >= 70
    assert len(imatrix.entries) == 30 * 7  # q, k, v, output, gate, up, down of each of the 30 blocks
    assert all((weights >= 0).all() and weights.mean() > 0 for weights in imatrix.entries.values())
