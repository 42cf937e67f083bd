"""The ggml types bpwopt adds to the installed gguf package: a Q2_0 tensor written and read back through gguf."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

import bpwopt
from bpwopt.formats import gguf_types
from bpwopt.formats.gguf_types import register_missing_types


def test_q2_0_is_a_gguf_type_with_ggmls_number_and_geometry():
    q2_0 = GGMLQuantizationType.Q2_0
    assert int(q2_0) == 42 and GGMLQuantizationType(42) is q2_0 and GGMLQuantizationType["Q2_0"] is q2_0
    assert q2_0 in list(GGMLQuantizationType) and GGML_QUANT_SIZES[q2_0] == (64, 18)


def test_registering_again_changes_nothing():
    members = list(GGMLQuantizationType)
    register_missing_types()
    assert list(GGMLQuantizationType) == members


def test_a_gguf_that_disagrees_with_ggml_is_refused(monkeypatch):
    monkeypatch.setattr(gguf_types, "MISSING_TYPES", {"Q2_0": (42, 32, 18)})
    with pytest.raises(RuntimeError, match="gguf defines type 42"):
        register_missing_types()


def test_a_q2_0_tensor_round_trips_through_gguf_files(tmp_path):
    rows = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
    data = bpwopt.quantize(rows, "Q2_0")
    writer = gguf.GGUFWriter(tmp_path / "q2.gguf", "llama")
    writer.add_tensor("w", data, raw_dtype=GGMLQuantizationType.Q2_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(tmp_path / "q2.gguf").tensors[0]
    assert tensor.tensor_type is GGMLQuantizationType.Q2_0 and list(tensor.shape) == [128, 4]
    np.testing.assert_array_equal(np.asarray(tensor.data).reshape(data.shape), data)
