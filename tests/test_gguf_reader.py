"""bpwopt's GGUF reader reads every file exactly as gguf's GGUFReader does, without an object per array item.

Each test writes a GGUF (gguf's own writer, or bpwopt's for what gguf's
refuses to write: empty arrays, random metadata), opens it with both readers
and compares every field (offset, contents, types, the bytes `copied_kv`
copies into an output) and every tensor (type, shape, offset, data).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from hypothesis import given, settings
from hypothesis import strategies as st

from bpwopt.formats.gguf_reader import LazyGGUFReader
from bpwopt.formats.gguf_writer import TensorSlot, copied_kv, encode_kv, write_gguf
from tests.conftest import save_gguf

NON_ASCII = ["", "naïve", "日本語", "🦙 llama", "Ġthe", "<0x0A>", "\x00nul"]
SCALARS = {  # value type -> (values to store, numpy dtype they are exact in)
    GGUFValueType.UINT8: ([0, 7, 255], np.uint8),
    GGUFValueType.INT8: ([-128, 0, 127], np.int8),
    GGUFValueType.UINT16: ([0, 65535], np.uint16),
    GGUFValueType.INT16: ([-32768, 32767], np.int16),
    GGUFValueType.UINT32: ([0, 2**32 - 1], np.uint32),
    GGUFValueType.INT32: ([-(2**31), 2**31 - 1], np.int32),
    GGUFValueType.FLOAT32: ([-1.5, 0.0, 3.25e38], np.float32),
    GGUFValueType.UINT64: ([0, 2**64 - 1], np.uint64),
    GGUFValueType.INT64: ([-(2**63), 2**63 - 1], np.int64),
    GGUFValueType.FLOAT64: ([-1e300, 5e-324, 0.1], np.float64),
    GGUFValueType.BOOL: ([True, False, True], np.bool_),
}


def assert_reads_like_gguf(path: Path) -> LazyGGUFReader:
    """Both readers agree on every field and tensor of path; returns ours."""
    ours, theirs = LazyGGUFReader(path), gguf.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for name, expected in theirs.fields.items():
        field = ours.fields[name]
        assert (field.offset, field.name) == (expected.offset, expected.name)
        assert field.contents() == expected.contents(), name
        assert copied_kv(field) == copied_kv(expected), name
        if expected.types != [GGUFValueType.ARRAY]:  # gguf's reader drops an empty array's item type
            assert field.types == expected.types, name
    assert (ours.alignment, ours.data_offset) == (theirs.alignment, theirs.data_offset)
    assert ours.data.tobytes() == theirs.data.tobytes()
    assert len(ours.tensors) == len(theirs.tensors)
    for tensor, expected in zip(ours.tensors, theirs.tensors, strict=True):
        assert (tensor.name, tensor.tensor_type, tensor.n_elements, tensor.n_bytes, tensor.data_offset) == (
            expected.name, expected.tensor_type, expected.n_elements, expected.n_bytes, expected.data_offset
        )  # fmt: skip
        assert tensor.shape.tolist() == expected.shape.tolist()
        assert (tensor.data.dtype, tensor.data.shape) == (expected.data.dtype, expected.data.shape)
        assert tensor.data.tobytes() == expected.data.tobytes()
        assert copied_kv(tensor.field) == copied_kv(expected.field)
    return ours


def test_the_demo_model_reads_as_with_gguf(demo_model_path):
    reader = assert_reads_like_gguf(demo_model_path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.parts) == 6  # key length, key, ARRAY, STRING, count, one span for all 49,152 strings
    assert len(tokens.contents()) == 49152
    # the writer's check that a tensor's bytes are still in the file needs np.memmap's views
    assert all(tensor.data._mmap is not None for tensor in reader.tensors)


def test_every_value_type_and_tensor_type_reads_as_with_gguf(tmp_path):
    path = tmp_path / "all.gguf"
    writer = gguf.GGUFWriter(path, arch="test")
    writer.add_custom_alignment(64)
    for value_type, (values, _) in SCALARS.items():
        writer.add_key_value(f"scalar.{value_type.name}", values[-1], value_type)
        writer.add_key_value(f"array.{value_type.name}", values, GGUFValueType.ARRAY, sub_type=value_type)
    writer.add_key_value("string.empty", "", GGUFValueType.STRING)
    writer.add_string("string.text", "naïve 日本語 🦙")
    writer.add_array("array.STRING", NON_ASCII)
    writer.add_array("array.one_string", ["x"])
    writer.add_tensor("f32", np.arange(96, dtype=np.float32).reshape(3, 32))
    writer.add_tensor("f16", np.linspace(-2, 2, 64, dtype=np.float16))
    writer.add_tensor("i32", np.arange(-8, 8, dtype=np.int32).reshape(2, 2, 4))
    writer.add_tensor("q8_0", np.arange(2 * 34, dtype=np.uint8).reshape(2, 34), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("q4_k", np.full((1, 144), 3, np.uint8), raw_dtype=GGMLQuantizationType.Q4_K)
    save_gguf(writer)

    reader = assert_reads_like_gguf(path)
    assert reader.alignment == 64
    assert reader.fields["array.STRING"].contents() == NON_ASCII
    assert reader.fields["array.INT64"].contents() == [-(2**63), 2**63 - 1]
    assert reader.fields["string.empty"].contents() == ""
    assert [t.data.shape for t in reader.tensors] == [(3, 32), (64,), (2, 2, 4), (2, 34), (1, 144)]


def test_single_items_and_slices_are_gguf_readers(tmp_path):
    path = tmp_path / "arrays.gguf"
    entries = [
        encode_kv("strings", GGUFValueType.ARRAY, NON_ASCII, GGUFValueType.STRING),
        encode_kv("floats", GGUFValueType.ARRAY, [0.5, -1.0, 2.0, 8.0], GGUFValueType.FLOAT32),
    ]
    write_gguf(path, entries, [], lambda index: [])
    ours, theirs = LazyGGUFReader(path), gguf.GGUFReader(path)
    for key in ("strings", "floats"):
        for index in (0, 3, -1, slice(1, 3), slice(None, None, -2)):
            assert ours.fields[key].contents(index) == theirs.fields[key].contents(index), (key, index)


def test_empty_arrays_keep_their_item_type(tmp_path):
    path = tmp_path / "empty.gguf"
    entries = [encode_kv(f"empty.{t.name}", GGUFValueType.ARRAY, [], t) for t in [*SCALARS, GGUFValueType.STRING]]
    write_gguf(path, entries, [], lambda index: [])  # gguf's writer refuses empty arrays
    reader = assert_reads_like_gguf(path)
    assert reader.fields["empty.STRING"].contents() == []
    assert reader.fields["empty.STRING"].types == [GGUFValueType.ARRAY, GGUFValueType.STRING]


def _metadata_value(value_type: GGUFValueType) -> st.SearchStrategy:
    if value_type == GGUFValueType.STRING:
        return st.text(max_size=12)
    if value_type == GGUFValueType.BOOL:
        return st.booleans()
    dtype = SCALARS[value_type][1]
    if value_type in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return st.floats(allow_nan=False, width=np.finfo(dtype).bits)
    info = np.iinfo(dtype)
    return st.integers(int(info.min), int(info.max))


@st.composite
def _entry(draw, key: str) -> bytes:
    value_type = draw(st.sampled_from([*SCALARS, GGUFValueType.STRING, GGUFValueType.ARRAY]))
    if value_type != GGUFValueType.ARRAY:
        return encode_kv(key, value_type, draw(_metadata_value(value_type)))
    item_type = draw(st.sampled_from([*SCALARS, GGUFValueType.STRING]))
    return encode_kv(key, value_type, draw(st.lists(_metadata_value(item_type), max_size=6)), item_type)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=8), max_size=8, unique=True).flatmap(
    lambda keys: st.tuples(*(_entry(f"k.{key}") for key in keys))
), st.integers(1, 3))  # fmt: skip
def test_random_metadata_reads_as_with_gguf(entries, n_tensors):
    slots = [TensorSlot(f"t{index}", (32, index + 1), GGMLQuantizationType.F32, 128 * (index + 1)) for index in
             range(n_tensors)]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.gguf"
        write_gguf(path, list(entries), slots, lambda index: [np.full(slots[index].nbytes, index + 1, np.uint8)])
        assert_reads_like_gguf(path)
