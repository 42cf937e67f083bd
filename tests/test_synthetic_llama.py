"""The scale benchmark's generated models: Llama's layout, llama.cpp quantizes them, the weights are hard.

A small shape with the real shapes' structure (grouped KV heads, tied or
untied output) stands in for the 1B and 8B ones, which take minutes and GBs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the benchmarks are scripts
import synthetic_llama

SMALL = synthetic_llama.LlamaShape("small", 256, 768, 2, 8, 2, 1000, tied_embeddings=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "small-f16.gguf"
    synthetic_llama.write_synthetic_llama(SMALL, path, seed=3)
    return path


def test_the_layout_is_llamas(model):
    reader = gguf.GGUFReader(model)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    assert shapes["blk.1.attn_k.weight"] == (256, 64) and shapes["blk.0.ffn_down.weight"] == (768, 256)
    assert shapes["output.weight"] == (256, 1000) and len(shapes) == 2 + 9 * 2 + 1
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    tied = synthetic_llama.tensor_shapes(dataclasses.replace(SMALL, tied_embeddings=True))
    assert "output.weight" not in dict(tied)


def test_llama_cpp_quantizes_it_to_q4_k_m(model, tmp_path):
    out = tmp_path / "q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(gguf.LlamaFileType.MOSTLY_Q4_K_M), 1
    assert llama_cpp.llama_model_quantize(str(model).encode(), str(out).encode(), ctypes.byref(params)) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.attn_norm.weight"] == "F32"


def test_weights_are_heavy_tailed_with_spread_row_scales(model):
    weights = next(t for t in gguf.GGUFReader(model).tensors if t.name == "blk.0.ffn_up.weight")
    rows = np.asarray(weights.data, dtype=np.float32)
    standardized = rows / rows.std(axis=1, keepdims=True)
    assert np.mean(standardized**4) > 5  # a Gaussian's kurtosis is 3; Student t with 5 dof has 9
    scales = rows.std(axis=1)
    assert scales.max() / scales.min() > 4 and 0.01 < np.median(scales) < 0.04


def test_the_same_seed_gives_the_same_file(model, tmp_path):
    again = tmp_path / "again.gguf"
    synthetic_llama.write_synthetic_llama(SMALL, again, seed=3)
    assert again.read_bytes() == model.read_bytes()
