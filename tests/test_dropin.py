"""End to end: `bpwopt IN OUT PRESET` writes what llama-quantize writes, byte for byte.

Two real models: SmolLM2-135M (llama architecture, Q4_1) and Gemma-3-270M
(gemma3, Q4_K_M, 640-wide rows that force the fallback types), every preset
of the issue on both. Files are compared through bpwopt's LazyGGUFReader
(tests/test_gguf_reader.py holds it equal to gguf's reader), which reads
Gemma's 262k-token vocabulary in a fraction of a second instead of ~20 s.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from bpwopt.cli.main import main
from bpwopt.demo import gemma3_path, smollm2_path
from bpwopt.formats.gguf_reader import LazyGGUFReader
from bpwopt.policy.presets import PRESETS_BY_NAME
from bpwopt.source.rows import tensor_rows

pytestmark = pytest.mark.slow  # every preset against llama-quantize on the demo models

PRESETS = ["Q4_0", "Q5_1", "Q8_0", "Q3_K_M", "Q4_K_M", "Q6_K", "IQ4_XS"]
MODELS: dict[str, Callable[[], Path]] = {"smollm2": smollm2_path, "gemma3": gemma3_path}
CASES = [(model, preset) for model in MODELS for preset in PRESETS]


def llama_quantize(
    source, destination, preset: str, prune_layers: tuple[int, ...] = (), keep_split: bool = False
) -> gguf.GGUFReader | None:
    """llama.cpp's llama_model_quantize through llama-cpp-python, as llama-quantize calls it.

    With keep_split, destination is the shards' prefix (llama-quantize strips OUT's .gguf) and nothing is returned.
    """
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(PRESETS_BY_NAME[preset].ftype)
    params.allow_requantize = True
    params.keep_split = keep_split
    params.nthread = 2
    prune = (ctypes.c_int32 * (len(prune_layers) + 1))(*prune_layers, -1)  # -1 ends the list
    if prune_layers:
        params.prune_layers = prune
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params)) == 0
    return None if keep_split else LazyGGUFReader(destination)


def metadata(reader: gguf.GGUFReader) -> dict[str, object]:
    """Every key and value except bpwopt's own provenance keys and the reader's header counts."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("bpwopt.", "GGUF.kv_count"))}


def assert_same_file(ours: gguf.GGUFReader, theirs: gguf.GGUFReader) -> None:
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == reference.tensor_type, mine.name
        assert np.array_equal(tensor_rows(mine), tensor_rows(reference)), mine.name
    assert metadata(ours) == metadata(theirs)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """(model, preset) -> (bpwopt's file, llama.cpp's file), each written once per test module."""
    folder = tmp_path_factory.mktemp("dropin")
    done: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(model: str, preset: str) -> tuple[Path, Path]:
        if (model, preset) not in done:
            source = MODELS[model]()
            ours, theirs = folder / f"{model}-{preset}.gguf", folder / f"{model}-{preset}-llama.gguf"
            llama_quantize(source, theirs, preset)
            assert main(["--allow-requantize", "--quiet", str(source), str(ours), preset]) == 0
            done[model, preset] = ours, theirs
        return done[model, preset]

    return make


@pytest.mark.parametrize(("model", "preset"), CASES)
def test_preset_is_byte_identical_to_llama_quantize(quantized, model, preset):
    ours, theirs = quantized(model, preset)
    assert_same_file(LazyGGUFReader(ours), LazyGGUFReader(theirs))


@pytest.mark.parametrize("model", MODELS)
def test_quantized_preset_loads_and_generates(quantized, model):
    ours, _ = quantized(model, "Q4_K_M")
    llm = llama_cpp.Llama(str(ours), n_ctx=128, verbose=False)
    assert llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"].strip()


def test_prune_layers_matches_llama_quantize(demo_model_path, tmp_path):
    pruned = (2, 7, 29)
    theirs = llama_quantize(demo_model_path, tmp_path / "llama.gguf", "Q4_K_M", prune_layers=pruned)
    argv = ["--allow-requantize", "--quiet", "--prune-layers", "29,2,7", str(demo_model_path), str(tmp_path / "o.gguf")]
    assert main([*argv, "Q4_K_M"]) == 0
    ours = LazyGGUFReader(tmp_path / "o.gguf")
    assert_same_file(ours, theirs)
    assert ours.fields["llama.block_count"].contents() == 27
    assert "blk.26.attn_v.weight" in {t.name for t in ours.tensors}
    assert "blk.27.attn_v.weight" not in {t.name for t in ours.tensors}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{model}", "{tmp}/o.gguf", "Q4_K_M"], "requantizing from type Q4_1 is disabled"),
        (["{model}", "{tmp}/o.gguf", "Q9_Z"], "unknown quantization type"),
        (["{tmp}/missing.gguf", "{tmp}/o.gguf", "Q4_0"], "no such file"),
        (["--override-kv", "a=blob:1", "{model}", "{tmp}/o.gguf", "Q4_0"], "KEY=TYPE:VALUE"),
        (["--allow-requantize", "{model}", "{model}", "Q8_0"], "the same"),
        (["--prune-layers", "3,-1", "{model}", "{tmp}/o.gguf", "Q4_0"], "invalid --prune-layers"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(demo_model_path, tmp_path, capsys, arguments, message):
    argv = [a.format(model=demo_model_path, tmp=tmp_path) for a in arguments]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "o.gguf").exists()
