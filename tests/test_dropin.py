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
from bpwopt.formats.imatrix import load_imatrix
from bpwopt.policy.presets import PRESETS_BY_NAME
from bpwopt.source.rows import tensor_rows
from tests.conftest import llama_imatrix_table

pytestmark = pytest.mark.slow  # every preset against llama-quantize on the demo models

PRESETS = ["Q4_0", "Q5_1", "Q8_0", "Q3_K_M", "Q4_K_M", "Q6_K", "IQ4_XS"]
# The i-quant, ternary, MXFP4, Q1_0 and Q2_0 presets, with each model's importance matrix (most need one, as in
# llama.cpp); those that do not, also without.
LOW_BIT_PRESETS = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M",
                   "TQ1_0", "TQ2_0", "MXFP4_MOE", "Q1_0", "Q2_0"]  # fmt: skip
WITHOUT_IMATRIX_TOO = ["IQ3_S", "IQ3_M", "TQ1_0", "TQ2_0", "MXFP4_MOE", "Q1_0", "Q2_0"]
MODELS: dict[str, Callable[[], Path]] = {"smollm2": smollm2_path, "gemma3": gemma3_path}
DATA = Path(__file__).resolve().parents[1] / "data"
IMATRICES = {"smollm2": DATA / "smollm2-135m-q4_1.imatrix.gguf",
             "gemma3": DATA / "gemma3-270m-offgrid-f16.imatrix.gguf"}  # fmt: skip
CASES = [
    *[(model, preset, False) for model in MODELS for preset in PRESETS + WITHOUT_IMATRIX_TOO],
    *[(model, preset, True) for model in MODELS for preset in ["Q4_K_M", *LOW_BIT_PRESETS]],
]
# What llama.cpp refuses on a model, bpwopt refuses with one line: Q1_0 has no fallback for SmolLM2's 576-wide rows.
REFUSED = {("smollm2", "Q1_0"): "no tensor type fallback is defined for type Q1_0"}
CASES = [case for case in CASES if case[:2] not in REFUSED]


def llama_quantize(
    source,
    destination,
    preset: str,
    prune_layers: tuple[int, ...] = (),
    keep_split: bool = False,
    imatrix: Path | None = None,
    refused: bool = False,
) -> gguf.GGUFReader | None:
    """llama.cpp's llama_model_quantize through llama-cpp-python, as llama-quantize calls it.

    With keep_split, destination is the shards' prefix (llama-quantize strips OUT's .gguf) and nothing is returned.
    An imatrix file is read by bpwopt's reader (sums over counts per row, as llama-quantize loads it).
    With refused, llama.cpp must fail (and nothing is returned).
    """
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(PRESETS_BY_NAME[preset].ftype)
    params.allow_requantize = True
    params.keep_split = keep_split
    params.nthread = 2
    if imatrix is not None:
        params.imatrix, _arrays = llama_imatrix_table(load_imatrix(imatrix).entries)  # alive until we return
    prune = (ctypes.c_int32 * (len(prune_layers) + 1))(*prune_layers, -1)  # -1 ends the list
    if prune_layers:
        params.prune_layers = prune
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params))
    assert (status != 0) == refused
    return None if keep_split or refused else LazyGGUFReader(destination)


# llama-quantize's main() adds these as --override-kv entries; llama_model_quantize alone does not write them.
IMATRIX_KEYS = "quantize.imatrix."


def metadata(reader: gguf.GGUFReader) -> dict[str, object]:
    """Every key and value except bpwopt's own provenance keys, the reader's header counts and the imatrix keys."""
    skipped = ("bpwopt.", "GGUF.kv_count", IMATRIX_KEYS)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(skipped)}


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
    done: dict[tuple[str, str, bool], tuple[Path, Path]] = {}

    def make(model: str, preset: str, with_imatrix: bool = False) -> tuple[Path, Path]:
        key = model, preset, with_imatrix
        if key not in done:
            source = MODELS[model]()
            stem = f"{model}-{preset}{'-imatrix' if with_imatrix else ''}"
            ours, theirs = folder / f"{stem}.gguf", folder / f"{stem}-llama.gguf"
            imatrix = IMATRICES[model] if with_imatrix else None
            llama_quantize(source, theirs, preset, imatrix=imatrix)
            weights = ["--imatrix", str(imatrix)] if imatrix else []
            assert main(["--allow-requantize", "--quiet", *weights, str(source), str(ours), preset]) == 0
            done[key] = ours, theirs
        return done[key]

    return make


@pytest.mark.parametrize(("model", "preset", "with_imatrix"), CASES)
def test_preset_is_byte_identical_to_llama_quantize(quantized, model, preset, with_imatrix):
    ours, theirs = quantized(model, preset, with_imatrix)
    assert_same_file(LazyGGUFReader(ours), LazyGGUFReader(theirs))
    written = {k: f.contents() for k, f in LazyGGUFReader(ours).fields.items() if k.startswith(IMATRIX_KEYS)}
    if with_imatrix:
        imatrix = load_imatrix(IMATRICES[model])
        assert written == {f"{IMATRIX_KEYS}file": str(IMATRICES[model]), f"{IMATRIX_KEYS}dataset": imatrix.datasets[0],
                           f"{IMATRIX_KEYS}entries_count": len(imatrix.entries),
                           f"{IMATRIX_KEYS}chunks_count": imatrix.chunk_count}  # fmt: skip
    else:
        assert not written


@pytest.mark.parametrize(("model", "preset"), REFUSED)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_what_llama_cpp_refuses_is_refused(tmp_path, capsys, model, preset, with_imatrix):
    source, imatrix = MODELS[model](), IMATRICES[model] if with_imatrix else None
    llama_quantize(source, tmp_path / "llama.gguf", preset, imatrix=imatrix, refused=True)
    capsys.readouterr()  # llama.cpp's log
    weights = ["--imatrix", str(imatrix)] if imatrix else []
    assert main(["--allow-requantize", *weights, str(source), str(tmp_path / "o.gguf"), preset]) == 1
    error = capsys.readouterr().err
    assert REFUSED[model, preset] in error and error.count("\n") == 1
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    ("preset", "with_imatrix"), [("Q4_K_M", False), ("IQ2_M", True), ("TQ2_0", False), ("Q2_0", False)]
)
def test_quantized_preset_loads_and_generates(quantized, model, preset, with_imatrix):
    ours, _ = quantized(model, preset, with_imatrix)
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
        (["--allow-requantize", "{model}", "{tmp}/o.gguf", "IQ2_XXS"], "requires an importance matrix"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(demo_model_path, tmp_path, capsys, arguments, message):
    argv = [a.format(model=demo_model_path, tmp=tmp_path) for a in arguments]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "o.gguf").exists()
