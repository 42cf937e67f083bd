"""End to end: `bpwopt IN OUT PRESET` writes what llama-quantize writes, byte for byte."""

from __future__ import annotations

import ctypes

import gguf
import llama_cpp
import numpy as np
import pytest

from bpwopt.cli import main
from bpwopt.model_writer import tensor_rows
from bpwopt.presets import PRESETS_BY_NAME

PRESETS = ["Q4_0", "Q5_1", "Q8_0", "Q3_K_M", "Q4_K_M", "Q6_K", "IQ4_XS"]


def llama_quantize(source, destination, preset: str) -> gguf.GGUFReader:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(PRESETS_BY_NAME[preset].ftype)
    params.allow_requantize = True
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params)) == 0
    return gguf.GGUFReader(destination)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_byte_identical_to_llama_quantize(demo_model_path, tmp_path, preset):
    theirs = llama_quantize(demo_model_path, tmp_path / "llama.gguf", preset)
    assert main(["--allow-requantize", "--quiet", str(demo_model_path), str(tmp_path / "ours.gguf"), preset]) == 0
    ours = gguf.GGUFReader(tmp_path / "ours.gguf")
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == reference.tensor_type, mine.name
        assert np.array_equal(tensor_rows(mine), tensor_rows(reference)), mine.name
    ours_kv = {k: f.contents() for k, f in ours.fields.items() if not k.startswith(("bpwopt.", "GGUF.kv_count"))}
    theirs_kv = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.kv_count")}
    assert ours_kv == theirs_kv


def test_quantized_preset_loads_and_generates(demo_model_path, tmp_path):
    out = tmp_path / "q4_k_m.gguf"
    assert main(["--allow-requantize", "--quiet", str(demo_model_path), str(out), "q4_k_m"]) == 0
    model = llama_cpp.Llama(str(out), n_ctx=128, verbose=False)
    assert model("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"].strip()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{model}", "{tmp}/o.gguf", "Q4_K_M"], "requantizing from type Q4_1 is disabled"),
        (["{model}", "{tmp}/o.gguf", "Q9_Z"], "unknown quantization type"),
        (["{tmp}/missing.gguf", "{tmp}/o.gguf", "Q4_0"], "no such file"),
        (["--override-kv", "a=blob:1", "{model}", "{tmp}/o.gguf", "Q4_0"], "KEY=TYPE:VALUE"),
        (["--allow-requantize", "{model}", "{model}", "Q8_0"], "the same"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(demo_model_path, tmp_path, capsys, arguments, message):
    argv = [a.format(model=demo_model_path, tmp=tmp_path) for a in arguments]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "o.gguf").exists()
