"""`--rounding best`: ggml's block formats with a lower error, measured and written the same way.

The formats are checked with an independent decoder (the gguf package's
`dequantize`, which follows ggml's C), the "never worse" promise block by
block against ggml's own bytes, and the plumbing end to end: the state
measures with the rounding it is named for, and the writer writes it.
"""

from __future__ import annotations

import sqlite3

import gguf
import llama_cpp
import numpy as np
import pytest

from bpwopt.cli.main import main
from bpwopt.errors import BpwoptError
from bpwopt.quant import codec
from bpwopt.quant.kernels import best_rounding, best_rounding_super
from bpwopt.quant.types import get_quant_type
from bpwopt.state.store import StateFile, StateIdentity, read_identity
from tests.conftest import ROW_KINDS, make_imatrix, make_rows

BEST_TYPES = sorted(t.name for t in best_rounding.KERNELS | best_rounding_super.KERNELS)


def block_errors(x: np.ndarray, q: np.ndarray, name: str, imatrix: np.ndarray | None) -> np.ndarray:
    """Σ w (x − x̂)² of every block (32 or 256 elements), x̂ decoded by the gguf package."""
    restored = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[name]).reshape(x.shape)
    weights = np.ones(x.shape[1]) if imatrix is None else imatrix.astype(np.float64)
    squared = weights * (x.astype(np.float64) - restored.astype(np.float64)) ** 2
    return squared.reshape(x.shape[0], -1, get_quant_type(name).block_size).sum(axis=2)


def test_the_types_with_a_best_kernel():
    assert BEST_TYPES == ["IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K",
                          "Q6_K", "Q8_0"]


@pytest.mark.parametrize("name", BEST_TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", ROW_KINDS)
def test_no_block_errs_more_than_ggml_and_any_decoder_reads_it(name, with_imatrix, kind):
    x = make_rows(kind, 4, 256, seed=7)
    imatrix = make_imatrix(256) if with_imatrix else None
    best = codec.quantize(x, name, imatrix, rounding="best")
    ggml = codec.quantize(x, name, imatrix)
    decoded = gguf.quants.dequantize(best, gguf.GGMLQuantizationType[name]).reshape(x.shape)
    np.testing.assert_array_equal(codec.dequantize(best, name), decoded)  # the stock format, nothing of our own
    with np.errstate(invalid="ignore", over="ignore"):
        ours, theirs = block_errors(x, best, name, imatrix), block_errors(x, ggml, name, imatrix)
    replaced = (best != ggml).reshape(4, -1, get_quant_type(name).block_bytes).any(axis=2)
    assert (ours[replaced] < theirs[replaced]).all()  # a block is replaced only by a strictly better one
    np.testing.assert_array_equal(ours[~replaced], theirs[~replaced])


@pytest.mark.parametrize("name", BEST_TYPES)
@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed"])
def test_best_lowers_the_error_of_ordinary_rows(name, kind):
    x = make_rows(kind, 16, 512, seed=3)
    for imatrix in (None, make_imatrix(512)):
        ggml, _ = codec.quant_error(x, name, imatrix)
        best, _ = codec.quant_error(x, name, imatrix, rounding="best")
        assert best < 0.99 * ggml, (name, imatrix is not None, best / ggml)


def test_types_without_a_best_kernel_quantize_as_ggml():
    x = make_rows("gaussian", 4, 256)
    for name in ("F32", "F16", "BF16"):
        np.testing.assert_array_equal(codec.quantize(x, name, rounding="best"), codec.quantize(x, name))


def test_an_unknown_rounding_is_refused():
    with pytest.raises(ValueError, match="unknown rounding 'fancy'; valid: ggml, best"):
        codec.quantize(make_rows("gaussian", 1, 32), "Q4_0", rounding="fancy")


def _identity(rounding: str) -> StateIdentity:
    return StateIdentity("ab" * 32, "m", None, ("Q4_0",), "precise", rounding)


def test_a_state_remembers_its_rounding_and_refuses_another(tmp_path):
    path = tmp_path / "s.bpw_state"
    StateFile.open(path, _identity("best")).close()
    assert read_identity(path).rounding == "best"
    with pytest.raises(BpwoptError, match="measured with --rounding best, not ggml; use another state file"):
        StateFile.open(path, _identity("ggml"))


def test_a_state_from_before_the_option_was_measured_with_ggml_rounding(tmp_path):
    path = tmp_path / "s.bpw_state"
    StateFile.open(path, _identity("ggml")).close()
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM identity WHERE key = 'rounding'")
    connection.close()
    assert read_identity(path).rounding == "ggml"
    StateFile.open(path, _identity("ggml")).close()


@pytest.mark.slow
def test_the_state_measures_and_the_file_holds_the_rounding_asked_for(demo_model_path, tmp_path, capsys):
    candidates = "Q4_0,Q5_0,Q8_0,Q4_K,Q6_K"  # blocks of 32 and super-blocks (ffn_down's 1536-wide rows)
    common = ["--allow-requantize", "--quiet", "--sample-rows", "8", "--candidates", candidates, "--json"]
    states = {rounding: tmp_path / f"{rounding}.bpw_state" for rounding in ("ggml", "best")}
    out = tmp_path / "best.gguf"
    for rounding, state in states.items():
        target = ["--target-bpw", "5.5", str(demo_model_path)] + ([str(out)] if rounding == "best" else ["--dry-run"])
        assert main([*common, "--rounding", rounding, "--state-file", str(state), *target]) == 0
    capsys.readouterr()
    measured = {}
    for rounding, state in states.items():
        with StateFile.open(state, read_identity(state)) as opened:
            measured[rounding] = {key: m.value("weighted_sse") for key, m in opened.measurements().items()}
    assert measured["best"].keys() == measured["ggml"].keys()
    changed = [key for key, error in measured["ggml"].items() if error > 0]  # 0: the source's own type, copied
    assert len(changed) > 500 and all(measured["best"][key] < measured["ggml"][key] for key in changed)

    reader = gguf.GGUFReader(out)
    assert reader.fields["bpwopt.rounding"].contents() == "best"
    source = {t.name: t for t in gguf.GGUFReader(demo_model_path).tensors}
    written = {t.tensor_type.name: t for t in reader.tensors if t.tensor_type.name in candidates.split(",")}
    assert {"Q4_K", "Q6_K"} & written.keys() and {"Q4_0", "Q5_0", "Q8_0"} & written.keys()
    for tensor in written.values():  # the bytes are the best kernel's, not ggml's
        rows = gguf.quants.dequantize(source[tensor.name].data, source[tensor.name].tensor_type)
        best = codec.quantize(np.ascontiguousarray(rows), tensor.tensor_type, rounding="best")
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(best.shape), best)
        assert not np.array_equal(best, codec.quantize(np.ascontiguousarray(rows), tensor.tensor_type))
    model = llama_cpp.Llama(str(out), n_ctx=128, verbose=False)
    assert model("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"].strip()
