"""The write stage: bytes and metadata as llama-quantize writes them, atomic on failure."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys

import gguf
import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from bpwopt.errors import BpwoptError
from bpwopt.formats.gguf_writer import TensorSlot, write_gguf
from bpwopt.formats.imatrix import check_imatrix_fits, load_imatrix
from bpwopt.policy.llama import llama_cpp_order
from bpwopt.source.rows import tensor_rows
from bpwopt.write.model_writer import WriteRequest, write_model
from tests.conftest import save_gguf

FTYPE_Q8_0 = 7


def raw(tensor) -> np.ndarray:
    return tensor_rows(tensor)


@pytest.fixture(scope="module")
def demo_reader(demo_model_path):
    return gguf.GGUFReader(demo_model_path)


@pytest.fixture(scope="module")
def llama_q8_0(demo_model_path, tmp_path_factory):
    """llama.cpp's own Q8_0 of the demo model."""
    path = tmp_path_factory.mktemp("llama") / "q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPE_Q8_0
    params.allow_requantize = True
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(demo_model_path).encode(), str(path).encode(), ctypes.byref(params)) == 0
    return gguf.GGUFReader(path)


@pytest.mark.slow  # the whole demo model against llama-quantize
def test_q8_0_of_every_matrix_is_byte_identical_to_llama_quantize(demo_reader, llama_q8_0, tmp_path):
    targets = {t.name: t.tensor_type for t in llama_q8_0.tensors}
    out = tmp_path / "ours.gguf"
    write_model(WriteRequest(reader=demo_reader, target_types=targets, file_type=FTYPE_Q8_0, progress=False), out)
    ours = gguf.GGUFReader(out)
    assert [t.name for t in ours.tensors] == [t.name for t in llama_q8_0.tensors]
    for mine, theirs in zip(ours.tensors, llama_q8_0.tensors, strict=True):
        assert mine.tensor_type == theirs.tensor_type
        assert np.array_equal(raw(mine), raw(theirs)), mine.name
    ours_kv = {k: f.contents() for k, f in ours.fields.items()}
    theirs_kv = {k: f.contents() for k, f in llama_q8_0.fields.items()}
    assert ours_kv == theirs_kv
    assert out.stat().st_size == os.path.getsize(llama_q8_0.data.filename)


@pytest.mark.slow  # its fixture runs llama.cpp's quantizer on the whole demo model
def test_output_order_is_llama_quantizes(demo_reader, llama_q8_0):
    assert llama_cpp_order([t.name for t in demo_reader.tensors]) == [t.name for t in llama_q8_0.tensors]


@pytest.mark.slow  # writes the demo model and loads it in llama.cpp
def test_written_file_loads_and_generates_in_llama_cpp(demo_reader, tmp_path):
    targets = {
        name: T.Q4_0
        if name.endswith("ffn_up.weight")
        else next(t.tensor_type for t in demo_reader.tensors if t.name == name)
        for name in llama_cpp_order([t.name for t in demo_reader.tensors])
    }
    out = tmp_path / "mixed.gguf"
    write_model(WriteRequest(reader=demo_reader, target_types=targets, file_type=3, progress=False), out)
    model = llama_cpp.Llama(str(out), n_ctx=128, verbose=False)
    text = model("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
    assert text.strip()


def test_failure_while_writing_leaves_no_output_and_no_temporary(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"the user's previous file")

    def failing_producer(index):
        yield np.zeros(8, np.uint8)
        raise RuntimeError("killed mid-tensor")

    slot = TensorSlot("t", (16,), T.F32, 64)
    with pytest.raises(RuntimeError):
        write_gguf(out, [], [slot], failing_producer)
    assert out.read_bytes() == b"the user's previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_short_tensor_is_refused_before_the_rename(tmp_path):
    out = tmp_path / "model.gguf"
    with pytest.raises(BpwoptError, match="produced 8 bytes"):
        write_gguf(out, [], [TensorSlot("t", (16,), T.F32, 64)], lambda i: [np.zeros(8, np.uint8)])
    assert not out.exists()


_FULL_DISK_SCRIPT = """
import resource, signal, sys
import numpy as np
from gguf import GGMLQuantizationType as T
from bpwopt.errors import BpwoptError
from bpwopt.formats.gguf_writer import TensorSlot, write_gguf
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_gguf(sys.argv[1], [], [TensorSlot("t", (4096,), T.F32, 16384)], lambda i: [np.zeros(16384, np.uint8)])
except BpwoptError as error:
    print(error)
    sys.exit(3)
"""


def test_full_disk_is_a_clear_error_and_leaves_nothing_behind(tmp_path):
    """RLIMIT_FSIZE makes writes past 4 KiB fail with EFBIG, as a full disk fails them with ENOSPC."""
    out = tmp_path / "big.gguf"
    result = subprocess.run([sys.executable, "-c", _FULL_DISK_SCRIPT, str(out)], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith(f"cannot write {out}")
    assert list(tmp_path.iterdir()) == []


def write_gguf_imatrix(path, entries: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_array("imatrix.datasets", ["calibration.txt"])
    writer.add_uint32("imatrix.chunk_count", 10)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        writer.add_tensor(f"{name}.counts", counts.astype(np.float32))
    save_gguf(writer)


def test_gguf_imatrix_is_sums_over_counts_per_expert(tmp_path):
    path = tmp_path / "imatrix.gguf"
    sums = np.arange(8, dtype=np.float32).reshape(2, 4)
    write_gguf_imatrix(path, {"blk.0.ffn_down.weight": (sums, np.array([[2.0], [0.0]]))})
    imatrix = load_imatrix(path)
    weights = imatrix.weights_for("blk.0.ffn_down.weight", 4, n_expert=2)
    np.testing.assert_array_equal(weights, [[0, 0.5, 1, 1.5], [1, 1, 1, 1]])
    assert imatrix.datasets == ["calibration.txt"] and imatrix.chunk_count == 10


def write_legacy_imatrix(path, entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str) -> None:
    parts = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        parts += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", ncall, values.size)]
        parts.append(values.astype("<f4").tobytes())
    parts += [struct.pack("<ii", chunks, len(dataset)), dataset.encode()]
    path.write_bytes(b"".join(parts))


def test_legacy_imatrix_is_divided_by_its_call_count(tmp_path):
    path = tmp_path / "imatrix.dat"
    write_legacy_imatrix(path, {"blk.0.attn_q.weight": (4, np.array([4.0, 8.0, 0.0]))}, 7, "wiki.txt")
    imatrix = load_imatrix(path)
    np.testing.assert_array_equal(imatrix.entries["blk.0.attn_q.weight"], [1, 2, 0])
    assert (imatrix.chunk_count, imatrix.datasets) == (7, ["wiki.txt"])


@pytest.mark.parametrize("cut", [2, 6, 30, 40])
def test_truncated_legacy_imatrix_is_a_clear_error(tmp_path, cut):
    path = tmp_path / "imatrix.dat"
    write_legacy_imatrix(path, {"blk.0.attn_q.weight": (4, np.ones(8))}, 1, "x")
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(BpwoptError):
        load_imatrix(path)


def test_imatrix_of_another_model_is_refused(tmp_path):
    path = tmp_path / "imatrix.dat"
    write_legacy_imatrix(path, {"model.layers.0.q_proj": (1, np.ones(8))}, 1, "x")
    with pytest.raises(BpwoptError, match="another model"):
        check_imatrix_fits(load_imatrix(path), {"blk.0.attn_q.weight"})


def test_imatrix_with_wrong_width_is_refused(tmp_path):
    path = tmp_path / "imatrix.dat"
    write_legacy_imatrix(path, {"blk.0.attn_q.weight": (1, np.ones(8))}, 1, "x")
    with pytest.raises(BpwoptError, match="another model"):
        load_imatrix(path).weights_for("blk.0.attn_q.weight", 576)
