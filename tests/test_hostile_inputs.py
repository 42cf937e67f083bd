"""Hostile inputs: every malformed model, imatrix, state file and option gets one error line, never a traceback.

The corpus is generated here, deterministically, from small valid inputs the
module writes itself: a five-tensor llama GGUF (gguf's own writer), a GGUF and
a legacy .dat imatrix for it, and a state file measured on it. Each case is
cut or patched at a known place (every section boundary, every header field,
counts and lengths of 2^63) and run through the command line in-process. A
case expected to fail must exit 1 with exactly one `bpwopt: error:` line (2
with argparse's usage for a malformed option), within seconds, and leave the
directory as it found it: no output, no temporary file, the state unchanged.
Cases that stay valid (a v2 header, a legacy imatrix without its trailer,
benign SQLite header bytes) are controls: they must succeed, and they are not
counted as hostile. A subset runs again in a child process under a 2 GiB
address-space limit, so that nothing is allocated from a count in a header.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from bpwopt.cli.main import main
from tests.conftest import save_gguf

SECONDS_PER_CASE = 5
ADDRESS_SPACE_LIMIT = 2 << 30
MODEL, IMATRIX, LEGACY, STATE, OUT = "model.gguf", "imatrix.gguf", "imatrix.dat", "run.bpw_state", "out.gguf"

INSPECT = ("inspect", MODEL)
DRY_RUN = ("--quiet", "--dry-run", MODEL, "Q8_0")
WRITE = ("--quiet", MODEL, OUT, "Q8_0")
MEASURE = ("--quiet", "--dry-run", "--target-bpw", "6", MODEL)
WITH_IMATRIX = ("--quiet", "--imatrix", IMATRIX, MODEL, OUT, "Q4_K")
WITH_LEGACY = ("--quiet", "--imatrix", LEGACY, MODEL, OUT, "Q4_K")
WITH_STATE = ("--quiet", "--target-bpw", "6", "--state-file", STATE, MODEL, OUT)
HUGE_COUNTS = (2**63, 2**64 - 1, 2**32, 10**6)
HEADER_NUMBERS = {  # what a huge value means -> the field that holds it
    "tensor count": "tensor_count",
    "metadata count": "kv_count",
    "key length": "kv0.key_length",
    "tensor name length": "tensor0.name_length",
    "row length": "tensor0.dim0",
    "data offset": "tensor1.offset",
}


# ---------------------------------------------------------------------------
# The valid inputs everything is derived from
# ---------------------------------------------------------------------------


def tiny_model(path: Path, *, with_tensors: bool = True) -> None:
    """A llama GGUF with what the policy reads, an F16 embedding, F32 norms and two 256-wide weights."""
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name("tiny")
    writer.add_custom_alignment(32)
    writer.add_block_count(1)
    writer.add_context_length(128)  # "llama.context_length", as long as "general.architecture"
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.token_type", [3, 1, 1, 1])
    writer.add_array("llama.attention.sliding_window_pattern", [True])  # one-byte items: a count of them costs most
    if with_tensors:
        writer.add_tensor("token_embd.weight", rng.standard_normal((16, 256)).astype(np.float16))
        writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, np.float32))
        writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((8, 256)).astype(np.float32))
        writer.add_tensor("blk.0.attn_k.weight", rng.standard_normal((8, 256)).astype(np.float16))
        writer.add_tensor("output_norm.weight", np.ones(256, np.float32))
    save_gguf(writer)


def gguf_imatrix(
    path: Path, entries: dict[str, np.ndarray], *, dtype=np.float32, metadata: bool = True, rows: int = 1
) -> None:
    """llama-imatrix's GGUF: <name>.in_sum2 (n_expert, n_per_row) and <name>.counts (n_expert, 1).

    rows: the rows each entry's sums are laid out in (1 for a dense tensor's).
    """
    writer = gguf.GGUFWriter(path, arch="imatrix")
    if metadata:
        writer.add_array("imatrix.datasets", ["calibration.txt"])
        writer.add_uint32("imatrix.chunk_count", 10)
        writer.add_uint32("imatrix.chunk_size", 512)
    for name, sums in entries.items():
        writer.add_tensor(f"{name}.in_sum2", sums.reshape(rows, -1).astype(dtype))
        writer.add_tensor(f"{name}.counts", np.array([[4.0]], dtype))
    save_gguf(writer)


IMATRIX_ENTRIES = {
    name: np.linspace(1, 2, 256, dtype=np.float32) for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")
}


def legacy_imatrix(entries: dict[str, tuple[int, np.ndarray]], trailer: bool = True) -> bytes:
    """The old .dat: count, then per entry (name length, name, ncall, nval, nval floats), then chunks and dataset."""
    parts = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        parts += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", ncall, values.size)]
        parts.append(values.astype("<f4").tobytes())
    if trailer:
        parts += [struct.pack("<ii", 10, len(b"calibration.txt")), b"calibration.txt"]
    return b"".join(parts)


LEGACY_BYTES = legacy_imatrix({name: (4, sums) for name, sums in IMATRIX_ENTRIES.items()})


def written_bytes(write: Callable[[Path], None]) -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "file.gguf"
        write(path)
        return path.read_bytes()


MODEL_BYTES = written_bytes(tiny_model)
IMATRIX_BYTES = written_bytes(lambda path: gguf_imatrix(path, IMATRIX_ENTRIES))


# ---------------------------------------------------------------------------
# Where every field of a GGUF is: the cut and patch points
# ---------------------------------------------------------------------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(data: bytes) -> dict[str, int]:
    """Offset of every field of a valid GGUF, in file order: 'kv3.key', 'tensor1.shape', 'data', ..."""
    fields: dict[str, int] = {}
    offset = 0

    def field(label: str, size: int) -> int:
        nonlocal offset
        fields[label] = offset
        offset += size
        return offset - size

    def number(label: str, fmt: str) -> int:
        return struct.unpack_from(fmt, data, field(label, struct.calcsize(fmt)))[0]

    field("magic", 4)
    number("version", "<I")
    n_tensors = number("tensor_count", "<Q")
    n_kv = number("kv_count", "<Q")
    for i in range(n_kv):
        field(f"kv{i}.key", number(f"kv{i}.key_length", "<Q"))
        value_type = number(f"kv{i}.type", "<I")
        if value_type == 8:
            field(f"kv{i}.string", number(f"kv{i}.string_length", "<Q"))
        elif value_type == 9:
            item_type = number(f"kv{i}.item_type", "<I")
            n_items = number(f"kv{i}.item_count", "<Q")
            for j in range(n_items):
                if item_type == 8:
                    field(f"kv{i}.item{j}", number(f"kv{i}.item{j}_length", "<Q"))
                else:
                    field(f"kv{i}.item{j}", _SCALAR_SIZES[item_type])
        else:
            field(f"kv{i}.value", _SCALAR_SIZES[value_type])
    for i in range(n_tensors):
        field(f"tensor{i}.name", number(f"tensor{i}.name_length", "<Q"))
        for d in range(number(f"tensor{i}.n_dims", "<I")):
            number(f"tensor{i}.dim{d}", "<Q")
        number(f"tensor{i}.type", "<I")
        number(f"tensor{i}.offset", "<Q")
    fields["padding"] = offset
    data_start = offset + -offset % 32
    for i in range(n_tensors):
        fields[f"tensor{i}.data"] = data_start + struct.unpack_from("<Q", data, fields[f"tensor{i}.offset"])[0]
    return fields


def patched(data: bytes, at: int, fmt: str, value) -> bytes:
    copy = bytearray(data)
    struct.pack_into(fmt, copy, at, value)
    return bytes(copy)


def replaced(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) >= 1
    return data.replace(old, new, 1)


def flipped(data: bytes, bit: int) -> bytes:
    copy = bytearray(data)
    copy[bit // 8] ^= 1 << (bit % 8)
    return bytes(copy)


# ---------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One input, the commands that read it, and what must happen: 'error' (exit 1), 'usage' (exit 2) or 'ok'."""

    name: str
    category: str
    runs: tuple[tuple[str, ...], ...]
    expected: str
    files: Callable[[dict[str, bytes]], dict[str, bytes]]  # valid inputs by file name -> this case's files
    huge: bool = False  # a count, length or size a trusting reader would loop over or allocate from


def model_case(name: str, data: bytes, expected: str = "error", runs=(INSPECT, DRY_RUN)) -> Case:
    return Case(name, "gguf model", tuple(runs), expected, lambda valid, data=data: {**valid, MODEL: data})


def structural_gguf_cases(base: bytes, category: str, runs, file_name: str, cut_inside: bool = True) -> list[Case]:
    """Cuts at (and just after) every field boundary, absurd counts, lengths, shapes, offsets and types, bad UTF-8."""
    fields = gguf_fields(base)

    def case(name: str, data: bytes, expected: str = "error", huge: bool = False) -> Case:
        return Case(name, category, runs, expected, lambda valid, data=data: {**valid, file_name: data}, huge)

    cases = [case(f"truncated at {label} (byte {offset})", base[:offset]) for label, offset in fields.items()]
    if cut_inside:
        cases += [case(f"truncated inside {label}", base[: offset + 1]) for label, offset in fields.items() if offset]
    cases.append(case("empty", b""))
    for value in HUGE_COUNTS:
        for label, field in HEADER_NUMBERS.items():
            cases.append(case(f"{label} {value}", patched(base, fields[field], "<Q", value), huge=True))
    for label in ("kv0.key_length", "tensor0.name_length"):
        length = struct.unpack_from("<Q", base, fields[label])[0]
        cases.append(case(f"{label} one too long", patched(base, fields[label], "<Q", length + 1)))
        cases.append(case(f"{label} one too short", patched(base, fields[label], "<Q", length - 1)))
        cases.append(case(f"{label} zero", patched(base, fields[label], "<Q", 0)))
    last_tensor = struct.unpack_from("<Q", base, fields["tensor_count"])[0] - 1
    cases.append(
        case("rows so many the data runs past the end", patched(base, fields["tensor0.dim1"], "<Q", 2**40), huge=True)
    )
    for dims in ((2**32, 2**32), (2**62, 4), (2**63, 2)):
        shape = patched(patched(base, fields["tensor0.dim0"], "<Q", dims[0]), fields["tensor0.dim1"], "<Q", dims[1])
        cases.append(case(f"shape {dims} overflows 64 bits", shape, huge=True))
    cases.append(case("zero rows", patched(base, fields["tensor0.dim1"], "<Q", 0)))
    for n_dims in (0, 5, 2**32 - 1):
        cases.append(case(f"{n_dims} dimensions", patched(base, fields["tensor0.n_dims"], "<I", n_dims)))
    for ggml_type in (4, 5, 31, 36, 42, 43, 1000, 2**32 - 1):
        cases.append(case(f"unknown ggml type {ggml_type}", patched(base, fields["tensor0.type"], "<I", ggml_type)))
    offset = struct.unpack_from("<Q", base, fields[f"tensor{last_tensor}.offset"])[0]
    for shift in (1, 4, 16, -32):
        moved = patched(base, fields[f"tensor{last_tensor}.offset"], "<Q", offset + shift)
        cases.append(case(f"last tensor's data offset moved by {shift}", moved))
    cases.append(
        case(
            "last tensor's data offset past the end",
            patched(base, fields[f"tensor{last_tensor}.offset"], "<Q", offset + (1 << 20)),
        )
    )
    for value_type in (13, 2**32 - 1):
        cases.append(case(f"unknown value type {value_type}", patched(base, fields["kv0.type"], "<I", value_type)))
    arrays = [label.removesuffix(".item_count") for label in fields if label.endswith(".item_count")]
    for array in arrays:
        for value in HUGE_COUNTS:
            items = patched(base, fields[f"{array}.item_count"], "<Q", value)
            cases.append(case(f"{array} holds {value} items", items, huge=True))
        cases.append(case(f"{array} is an array of arrays", patched(base, fields[f"{array}.item_type"], "<I", 9)))
        cases.append(case(f"{array} of unknown item type", patched(base, fields[f"{array}.item_type"], "<I", 13)))
        if f"{array}.item0_length" in fields:
            item = patched(base, fields[f"{array}.item0_length"], "<Q", 2**63)
            cases.append(case(f"{array} item 0 of 2^63 bytes", item, huge=True))
    strings = [label.removesuffix("_length") for label in fields if label.endswith(".string_length")]
    for label in strings:
        cases.append(case(f"{label} of 2^63 bytes", patched(base, fields[f"{label}_length"], "<Q", 2**63), huge=True))
    cases.append(case("a key that is not UTF-8", patched(base, fields["kv0.key"], "<B", 0xFF)))
    cases.append(case("a tensor name that is not UTF-8", patched(base, fields["tensor0.name"], "<B", 0xFF)))
    return cases


def model_cases() -> list[Case]:
    base = MODEL_BYTES
    fields = gguf_fields(base)
    cases = structural_gguf_cases(base, "gguf model", (INSPECT, DRY_RUN), MODEL)
    for bit in range(32):
        cases.append(model_case(f"magic bit {bit} flipped", flipped(base, bit)))
    for bit in range(1, 32):  # bit 0 turns version 3 into 2, which is valid: a control below
        cases.append(model_case(f"version bit {bit} flipped", flipped(base, 32 + bit)))
    for bit in range(16, 64, 4):  # from bit 16 on, a count cannot fit in the file
        cases.append(model_case(f"tensor count bit {bit} flipped", flipped(base, 64 + bit)))
        cases.append(model_case(f"metadata count bit {bit} flipped", flipped(base, 128 + bit)))
    cases.append(model_case("GGUF version 2 (valid: same layout)", flipped(base, 32), expected="ok"))
    alignment = base.index(b"general.alignment") + len("general.alignment") + 4  # after the key, its type
    for value in (0, 3, 48):
        cases.append(model_case(f"general.alignment {value}", patched(base, alignment, "<I", value)))
    cases.append(model_case("general.alignment 4096 moves every later tensor", patched(base, alignment, "<I", 4096)))
    cases.append(model_case("general.alignment stored as INT32", patched(base, alignment - 4, "<I", 5)))
    cases.append(model_case("a duplicate key", replaced(base, b"llama.context_length", b"general.architecture")))
    cases.append(model_case("a duplicate tensor name", replaced(base, b"blk.0.attn_k.weight", b"blk.0.attn_q.weight")))
    no_architecture = replaced(base, b"general.architecture", b"general.architectur_")
    cases.append(model_case("no general.architecture", no_architecture, runs=(DRY_RUN,)))
    cases.append(model_case("no general.architecture, inspected", no_architecture, expected="ok", runs=(INSPECT,)))
    no_blocks = replaced(base, b"llama.block_count", b"llama.block_coun_")
    cases.append(model_case("no llama.block_count", no_blocks, runs=(DRY_RUN,)))
    cases.append(model_case("no llama.block_count, inspected", no_blocks, expected="ok", runs=(INSPECT,)))
    no_tensors = written_bytes(lambda path: tiny_model(path, with_tensors=False))
    cases.append(model_case("no tensors", no_tensors, runs=(DRY_RUN,)))
    cases.append(model_case("no tensors, inspected", no_tensors, expected="ok", runs=(INSPECT,)))
    q_type = fields["tensor2.type"]  # blk.0.attn_q.weight, F32
    as_int32 = patched(base, q_type, "<I", gguf.GGMLQuantizationType.I32)
    cases.append(model_case("an I32 weight to requantize", as_int32, runs=(WRITE, MEASURE)))
    cases.append(model_case("an I32 weight, planned only", as_int32, expected="ok", runs=(INSPECT, DRY_RUN)))
    embedding_as_bf16 = patched(base, fields["tensor0.type"], "<I", gguf.GGMLQuantizationType.BF16)
    cases.append(model_case("an F16 embedding relabelled BF16 (valid)", embedding_as_bf16, "ok", (INSPECT, DRY_RUN)))
    nan_weight = patched(base, fields["tensor2.data"] + 4 * 300, "<f", float("nan"))
    cases.append(model_case("a NaN in an F32 weight", nan_weight, runs=(WRITE, MEASURE)))
    cases.append(model_case("a NaN in an F32 weight, inspected and planned", nan_weight, "ok", (INSPECT, DRY_RUN)))
    inf_embedding = patched(base, fields["tensor0.data"] + 2 * 77, "<e", float("inf"))
    cases.append(model_case("an infinity in the F16 embedding", inf_embedding, runs=(WRITE, MEASURE)))
    nan_norm = patched(base, fields["tensor1.data"] + 4 * 9, "<f", float("nan"))  # a norm: copied, never quantized
    cases.append(model_case("a NaN in a copied F32 norm", nan_norm, runs=(WRITE,)))
    cases.append(model_case("a directory", b"", runs=(("inspect", "."), ("--quiet", "--dry-run", ".", "Q8_0"))))
    cases.append(model_case("missing", b"", runs=(("inspect", "absent.gguf"), ("--quiet", "absent.gguf", OUT, "Q8_0"))))
    cases.append(model_case("the imatrix given as the model", IMATRIX_BYTES, runs=(DRY_RUN,)))
    cases.append(model_case("a legacy imatrix given as the model", LEGACY_BYTES))
    cases.append(model_case("random bytes", np.random.default_rng(1).bytes(4096)))
    cases.append(model_case("magic then random bytes", b"GGUF" + np.random.default_rng(2).bytes(4096)))
    return cases


def imatrix_cases() -> list[Case]:
    """Both formats, through `--imatrix FILE IN OUT Q4_K`: the imatrix is read, checked and used to quantize."""
    cases = structural_gguf_cases(IMATRIX_BYTES, "imatrix (GGUF)", (WITH_IMATRIX,), IMATRIX, cut_inside=False)

    def gguf_case(name: str, data: bytes, expected: str = "error") -> Case:
        return Case(
            name, "imatrix (GGUF)", (WITH_IMATRIX,), expected, lambda valid, data=data: {**valid, IMATRIX: data}
        )

    def legacy_case(name: str, data: bytes, expected: str = "error", huge: bool = False) -> Case:
        return Case(name, "imatrix (.dat)", (WITH_LEGACY,), expected, lambda valid, d=data: {**valid, LEGACY: d}, huge)

    fields = gguf_fields(IMATRIX_BYTES)
    sums = fields["tensor0.data"]
    for label, value in (("a NaN", float("nan")), ("an infinity", float("inf")), ("a negative sum", -1.0)):
        cases.append(gguf_case(f"{label} in in_sum2", patched(IMATRIX_BYTES, sums + 40, "<f", value)))
    counts = fields["tensor1.data"]  # the first entry's only count
    for label, value in (("a NaN", float("nan")), ("a negative", -4.0)):
        cases.append(gguf_case(f"{label} count", patched(IMATRIX_BYTES, counts, "<f", value)))
    no_input = patched(IMATRIX_BYTES, counts, "<f", 0.0)
    cases.append(gguf_case("a count of 0 (tolerated: weights of 1, as in llama.cpp)", no_input, "ok"))
    halves = written_bytes(lambda p: gguf_imatrix(p, IMATRIX_ENTRIES, rows=2))  # right size, one count for 2 rows
    cases.append(gguf_case("sums in 2 rows with 1 count", halves))
    cases.append(
        gguf_case("sums without counts", replaced(IMATRIX_BYTES, b"attn_k.weight.counts", b"attn_k.weight.countz"))
    )
    cases.append(gguf_case("no chunk_size", replaced(IMATRIX_BYTES, b"imatrix.chunk_size", b"imatrix.chunk_sizz")))
    other_model = replaced(replaced(IMATRIX_BYTES, b"blk.0.attn_q", b"blk.9.wq_xx_"), b"blk.0.attn_k", b"blk.9.wk_xx_")
    cases.append(gguf_case("entries of another model", other_model))
    narrow = {name: sums[:128] for name, sums in IMATRIX_ENTRIES.items()}
    cases.append(gguf_case("entries 128 wide for 256-wide weights", written_bytes(lambda p: gguf_imatrix(p, narrow))))
    cases.append(gguf_case("F16 entries", written_bytes(lambda p: gguf_imatrix(p, IMATRIX_ENTRIES, dtype=np.float16))))
    cases.append(gguf_case("no entries", written_bytes(lambda p: gguf_imatrix(p, {}))))
    cases.append(gguf_case("no metadata", written_bytes(lambda p: gguf_imatrix(p, IMATRIX_ENTRIES, metadata=False))))
    cases.append(gguf_case("the model given as the imatrix", MODEL_BYTES))
    cases.append(gguf_case("a valid imatrix (control)", IMATRIX_BYTES, expected="ok"))
    cases.append(gguf_case("the padding after the last tensor cut (valid)", IMATRIX_BYTES[:-1], expected="ok"))

    base = LEGACY_BYTES
    name_length = len("blk.0.attn_q.weight")
    entry = 4 + name_length + 8 + 4 * 256  # bytes of one entry
    first = {"entry count": 0, "name length": 4, "name": 8, "ncall": 8 + name_length, "nval": 12 + name_length}
    first["values"] = 16 + name_length
    for label, offset in first.items():
        for at in (offset, offset + 1, offset + entry):
            cases.append(legacy_case(f"truncated at {label} (byte {at})", base[:at]))
    cases.append(
        legacy_case("truncated inside the second entry's values", base[: 4 + entry + 4 + name_length + 8 + 500])
    )
    for value in (2**31 - 1, -1, 0, 10**6):
        cases.append(legacy_case(f"entry count {value}", patched(base, 0, "<i", value), huge=True))
    for value in (2**31 - 1, -5, 0):
        cases.append(legacy_case(f"name length {value}", patched(base, first["name length"], "<i", value), huge=True))
    for value in (2**31 - 1, -1, 0, 128):
        cases.append(legacy_case(f"{value} values", patched(base, first["nval"], "<i", value), huge=True))
    for label, value in (("a NaN", float("nan")), ("an infinity", float("inf")), ("a negative value", -1.0)):
        cases.append(legacy_case(f"{label}", patched(base, first["values"] + 8, "<f", value)))
    for seed in range(5):
        cases.append(legacy_case(f"random bytes (seed {seed})", np.random.default_rng(seed).bytes(100 + 700 * seed)))
    cases.append(legacy_case("GGUF magic then zeros", b"GGUF" + bytes(60)))
    other = legacy_imatrix({"model.layers.0.q_proj": (1, np.ones(256))})
    cases.append(legacy_case("entries of another model", other))
    cases.append(legacy_case("a valid legacy imatrix (control)", base, expected="ok"))
    trailer = len(base) - (8 + len(b"calibration.txt"))
    for cut in (trailer, trailer + 4, trailer + 8):  # chunk count and dataset name are optional, as in llama.cpp
        cases.append(legacy_case(f"no trailer after byte {cut} (tolerated)", base[:cut], expected="ok"))
    cases.append(legacy_case("a negative ncall", patched(base, first["ncall"], "<i", -3)))
    cases.append(
        legacy_case("an ncall of 0 (tolerated: sums used as they are)", patched(base, first["ncall"], "<i", 0), "ok")
    )
    return cases


# SQLite's header (https://sqlite.org/fileformat.html#the_database_header), byte by byte: what a changed
# byte does. Bytes SQLite checks or bpwopt checks are hostile; the rest it ignores or rewrites (controls).
SQLITE_HEADER_CHECKED = [
    *range(0, 16),  # magic
    16,
    17,  # page size
    18,
    19,  # write / read format versions (bpwopt refuses what SQLite would open read-only)
    20,
    21,
    22,
    23,  # reserved space, payload fractions
    *range(28, 40),  # page count, first freelist page, freelist pages
    47,  # schema format number (low byte)
    *range(52, 56),  # largest root page (auto-vacuum)
    *range(64, 72),  # incremental vacuum, application id
]
SQLITE_HEADER_IGNORED = [*range(24, 28), *range(40, 47), *range(48, 52), *range(56, 64), *range(72, 100)]


def state_case(name: str, change: Callable[[bytes], bytes] | None = None, sql: str | None = None, expected="error"):
    def files(valid: dict[str, bytes]) -> dict[str, bytes]:
        state = valid[STATE] if change is None else change(valid[STATE])
        if sql is not None:
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory) / STATE
                path.write_bytes(state)
                connection = sqlite3.connect(path)
                connection.executescript(sql)
                connection.close()
                state = path.read_bytes()
        return {**valid, STATE: state}

    return Case(name, "state file", (WITH_STATE,), expected, files)


def state_cases() -> list[Case]:
    cases = [state_case(f"truncated to {n} bytes", lambda data, n=n: data[:n]) for n in (0, 1, 50, 99, 100, 101, 1000)]
    cases += [state_case(f"truncated to {n} pages", lambda data, n=n: data[: 4096 * n]) for n in range(1, 7)]
    cases += [
        state_case(f"truncated inside page {n + 1}", lambda data, n=n: data[: 4096 * n + 2000]) for n in range(1, 6)
    ]
    cases += [
        state_case(f"header byte {i} changed", lambda data, i=i: flipped(data, 8 * i + 4))
        for i in SQLITE_HEADER_CHECKED
    ]
    cases += [
        state_case(
            f"header byte {i} changed (ignored by SQLite)", lambda data, i=i: flipped(data, 8 * i + 4), expected="ok"
        )
        for i in SQLITE_HEADER_IGNORED[::4]
    ]
    for page in (2, 3, 5):
        noise = np.random.default_rng(page).bytes(4096)
        cases.append(
            state_case(
                f"page {page} replaced by noise", lambda d, p=page, n=noise: d[: 4096 * (p - 1)] + n + d[4096 * p :]
            )
        )
        cases.append(
            state_case(f"page {page} zeroed", lambda d, p=page: d[: 4096 * (p - 1)] + bytes(4096) + d[4096 * p :])
        )
    cases.append(state_case("the model given as the state", lambda data: MODEL_BYTES))
    cases.append(state_case("random bytes", lambda data: np.random.default_rng(3).bytes(8192)))
    cases.append(state_case("SQLite magic then zeros", lambda data: b"SQLite format 3\x00" + bytes(8176)))
    altered = {
        "measured for another model": "UPDATE identity SET value = '00' || substr(value, 3) WHERE key = 'model_sha256'",
        "measured with an imatrix": "UPDATE identity SET value = 'ab' WHERE key = 'imatrix_sha256'",
        "measured with other candidates": "UPDATE identity SET value = 'Q4_K' WHERE key = 'candidates'",
        "measured with other sampling": "UPDATE identity SET value = 'precise' WHERE key = 'sampling'",
        "format version 99": "UPDATE identity SET value = '99' WHERE key = 'format_version'",
        "format version not a number": "UPDATE identity SET value = 'abc' WHERE key = 'format_version'",
        "no format version": "DELETE FROM identity WHERE key = 'format_version'",
        "no sampling in its identity": "DELETE FROM identity WHERE key = 'sampling'",
        "no identity table": "DROP TABLE identity",
        "no measurements table": "DROP TABLE measurements",
        "no tensors table": "PRAGMA foreign_keys = OFF; DROP TABLE tensors",
        "another program's application id": "PRAGMA application_id = 0",
        "no statistics table": "DROP TABLE statistics",
        "a NaN measurement": "UPDATE statistics SET value = NULL",
        "an infinite measurement": "UPDATE statistics SET value = 9e999 WHERE qtype = 'Q4_K'",
        "a negative measurement": "UPDATE statistics SET value = -1 WHERE qtype = 'Q6_K' AND name = 'weighted_sse'",
        "a negative byte count": "UPDATE measurements SET nbytes = -100 WHERE qtype = 'Q8_0'",
        "a tensor shape that is not JSON": "UPDATE tensors SET shape = 'not json'",
        "a NaN group weight": "INSERT INTO weights VALUES ('attn_q', NULL)",
        "a negative group weight": "INSERT INTO weights VALUES ('attn_q', -5)",
        "a trigger that aborts inserts": (
            "CREATE TRIGGER t AFTER INSERT ON measurements BEGIN SELECT RAISE(ABORT, 'no'); END;"
            "DELETE FROM measurements WHERE qtype = 'Q4_K'"
        ),
        "a view in place of the measurements": (
            "ALTER TABLE measurements RENAME TO m; CREATE VIEW measurements AS SELECT * FROM m"
        ),
    }
    cases += [state_case(name, sql=sql) for name, sql in altered.items()]
    benign = {
        "an extra table (control)": "CREATE TABLE notes (text TEXT)",
        "some measurements deleted (control: measured again)": "DELETE FROM measurements WHERE qtype = 'Q4_K'",
        "rollback journal instead of WAL (control)": "PRAGMA journal_mode = DELETE",
    }
    cases += [state_case(name, sql=sql, expected="ok") for name, sql in benign.items()]
    cases.append(
        Case(
            "a directory as the state",
            "state file",
            (("--quiet", "--target-bpw", "6", "--state-file", ".", MODEL, OUT),),
            "error",
            dict,
        )
    )
    cases.append(state_case("the valid state (control)", expected="ok"))
    return cases


def option_cases() -> list[Case]:
    """Sizes, numbers, regexes, types and key=value text on the command line."""
    cases = []

    def case(name: str, argv: tuple[str, ...], expected: str = "error") -> None:
        cases.append(Case(name, "command line", (argv,), expected, dict))

    for size in (
        "abc",
        "1e400",
        "nan",
        "inf",
        "0",
        "0.1",
        "1.5.5gb",
        "10XB",
        "",
        " ",
        "1_000",
        "9" * 400,
        "1e3",
        "10 M B",
    ):
        case(f"--target-size {size[:12]!r}", ("--quiet", "--dry-run", "--target-size", size, MODEL))
    case("--target-size -5MB (argparse: looks like an option)", ("--dry-run", "--target-size", "-5MB", MODEL), "usage")
    case("--target-size 3 bytes, below every plan", ("--quiet", "--dry-run", "--target-size", "3", MODEL))
    for bpw in ("nan", "inf", "-1", "0", "1e308", "33", "1e-300"):
        case(f"--target-bpw {bpw}", ("--quiet", "--dry-run", "--target-bpw", bpw, MODEL))
    for text in ("abc", "4,5", ""):
        case(f"--target-bpw {text!r}", ("--dry-run", "--target-bpw", text, MODEL), "usage")
    case("both targets", ("--quiet", "--dry-run", "--target-bpw", "5", "--target-size", "1MB", MODEL))
    for regex in ("(", "[a-", "*", "a{99999999999}", "(" * 5000 + ")" * 5000, "(?P<a>x)(?P<a>y)", "(?<=a+)b", "\\"):
        shown = regex if len(regex) < 20 else regex[:8] + "…"
        case(f"--tensor-type {shown!r}=Q4_K", ("--quiet", "--dry-run", "--tensor-type", f"{regex}=q4_k", MODEL, "Q4_K"))
        case(f"--ignore {shown!r}", ("--quiet", "--dry-run", "--ignore", regex, MODEL, "Q4_K"))
        case(
            f"--ignore {shown!r} with a target", ("--quiet", "--dry-run", "--target-bpw", "6", "--ignore", regex, MODEL)
        )
    for text in ("attn", "=Q4_K", "attn=", "attn=Q9_K", "attn=Q4_K_M", "attn=F64", "attn=NVFP4",
                 "attn=IQ2_XXS"):  # fmt: skip
        case(f"--tensor-type {text!r}", ("--quiet", "--dry-run", "--tensor-type", text, MODEL, "Q4_K"))
    for text in ("Q9_K", "", ",,,", "F64", "IQ2_XXS", "NVFP4", "F32"):
        case(f"--candidates {text!r}", ("--quiet", "--dry-run", "--target-bpw", "6", "--candidates", text, MODEL))
    for text in (
        "x",
        "a=int:z",
        "a=bool:yes",
        "=int:1",
        "a=list:1",
        "a=int:99999999999999999999",
        "general.alignment=int:64",
    ):
        case(f"--override-kv {text!r}", ("--quiet", "--override-kv", text, MODEL, OUT, "Q8_0"))
    for text in ("a,b", "-1", ",", "1;2"):
        case(f"--prune-layers {text!r}", ("--quiet", "--dry-run", "--prune-layers", text, MODEL, "Q4_K"))
    for text in ("1", "0", "-5"):
        case(f"--sample-rows {text}", ("--quiet", "--dry-run", "--target-bpw", "6", "--sample-rows", text, MODEL))
    for text in ("-1", "nan", "inf"):
        case(f"--time-limit {text}", ("--quiet", "--dry-run", "--target-bpw", "6", "--time-limit", text, MODEL))
    for option in ("--sample-rows", "--seed", "--time-limit", "--threads"):
        case(f"{option} abc", ("--dry-run", "--target-bpw", "6", option, "abc", MODEL), "usage")
    for text in ("Q9_K", "999", "-1", "", "F64", "NVFP4", "IQ2_XXS"):
        case(f"TYPE {text!r}", ("--quiet", "--dry-run", MODEL, text))
    for option in ("--output-tensor-type", "--token-embedding-type"):
        for text in ("Q9_K", "F64", "999"):
            case(f"{option} {text}", ("--quiet", "--dry-run", option, text, MODEL, "Q4_K"))
    case("THREADS not a number", ("--quiet", "--dry-run", MODEL, OUT, "Q4_K", "x"))
    case("five positionals", ("--quiet", "--dry-run", MODEL, OUT, "Q4_K", "2", "x"))
    case("no TYPE", ("--quiet", MODEL))
    case(
        "--include-weights with --exclude-weights",
        ("--dry-run", "--include-weights", "a", "--exclude-weights", "b", MODEL, "Q4_K"),
    )
    case("--override-kv of a split key", ("--quiet", "--dry-run", "--override-kv", "split.count=int:2", MODEL, "Q4_K"))
    case("the output is the input", ("--quiet", MODEL, MODEL, "Q8_0"))
    case("the output is a directory", ("--quiet", MODEL, ".", "Q8_0"))
    case("the output's directory is missing", ("--quiet", MODEL, "nowhere/out.gguf", "Q8_0"))
    case("an unknown option", ("--frobnicate", MODEL, "Q8_0"), "usage")
    case("inspect without a file", ("inspect",), "usage")
    return cases


CONFIG_TOML, CONFIG_YAML = "job.toml", "job.yaml"
# Every proper prefix of these is an error: without the last line there is neither TYPE nor target, and a
# cut inside the last line leaves its string open. Only the whole file, final newline or not, is valid.
VALID_TOML = b"""\
# a dry run of model.gguf under a budget
quiet = true
dry-run = true
tensor-type = ["attn_q=q8_0", "attn_k=q8_0"]
sample_rows = 64
target-size = "11KB"
"""
VALID_YAML = b"""\
# a dry run of model.gguf under a budget
quiet: true
dry-run: true
tensor-type: [attn_q=q8_0, attn_k=q8_0]
sample_rows: 64
target-size: "11KB"
"""


def config_cases() -> list[Case]:
    """--config FILE: cut, flipped, not UTF-8, huge, nested, YAML alias bombs, unknown keys, wrong types."""
    cases = []

    def case(name, data, expected="error", file_name=CONFIG_TOML, extra=(), huge=False, positional=(MODEL,)):
        runs = (("--config", file_name, *extra, *positional),)
        cases.append(
            Case(name, "config file", runs, expected, lambda valid, d=data, f=file_name: {**valid, f: d}, huge)
        )

    def shown(text: str) -> str:
        return " / ".join(text.strip()[:40].splitlines())

    def toml(text: str, name: str | None = None) -> None:
        case(name or f"TOML {shown(text)}", text.encode())

    def yaml(text: str, name: str | None = None, huge: bool = False) -> None:
        case(name or f"YAML {shown(text)}", text.encode(), file_name=CONFIG_YAML, huge=huge)

    for data, file_name in ((VALID_TOML, CONFIG_TOML), (VALID_YAML, CONFIG_YAML)):
        kind = file_name.rsplit(".", 1)[1].upper()
        ends = [i for i, byte in enumerate(data) if byte == ord("\n")]
        starts = [0] + [end + 1 for end in ends[:-1]]
        middles = [start + (end - start) // 2 for start, end in zip(starts, ends, strict=True)]
        cuts = {*ends[:-1], *middles, len(data) - 2}
        for cut in sorted(cuts):
            case(f"{kind} truncated at byte {cut}", data[:cut], file_name=file_name)
        key_bytes = [i for start, end in zip(starts[1:], ends[1:], strict=True) for i in range(start, start + 5)]
        rng = np.random.default_rng(11)
        for _ in range(6):
            at = int(rng.choice(key_bytes))
            bit = int(rng.integers(0, 8))
            case(f"{kind} key byte {at} bit {bit} flipped", flipped(data, 8 * at + bit), file_name=file_name)
        case(f"{kind} in Latin-1", b"# caf\xe9\n" + data, file_name=file_name)
        case(f"{kind} in UTF-16", data.decode().encode("utf-16"), file_name=file_name)
        case(f"valid {kind} (control)", data, "ok", file_name)
    case("valid YAML as .yml (control)", VALID_YAML, "ok", "job.yml")
    case("valid TOML with a byte-order mark (control)", b"\xef\xbb\xbf" + VALID_TOML, "ok")
    case("TOML of exactly 1 MiB (control)", VALID_TOML + b"#" * ((1 << 20) - len(VALID_TOML) - 1) + b"\n", "ok")
    case("TOML of 1 MiB and a byte", VALID_TOML + b"#" * ((1 << 20) - len(VALID_TOML)) + b"\n", huge=True)
    case("8 MiB of comment", b"#" * (8 << 20), huge=True)
    case("the command line's list replaces a bad one (control)", VALID_TOML.replace(b"q8_0", b"Q9_K"), "ok",
         extra=("--tensor-type", "attn_q=q8_0"))  # fmt: skip
    case("the command line's target wins (control)", VALID_TOML, "ok", extra=("--target-size", "10KB"))
    case("input and type from the file (control)", b'input = "model.gguf"\ntype = "Q8_0"\ndry-run = true\n', "ok",
         positional=())  # fmt: skip
    case("type without input", b'type = "Q8_0"\n', positional=())
    case("no positionals anywhere", b"dry-run = true\n", "usage", positional=())
    cases.append(Case("missing", "config file", (("--config", "absent.toml", MODEL),), "error", dict))
    cases.append(Case("a directory", "config file", (("--config", ".", MODEL),), "error", dict))
    case("an .ini file", b"dry-run = true\n", file_name="job.ini")
    case("no extension", VALID_TOML, file_name="job")
    case("random bytes", np.random.default_rng(4).bytes(2000))
    case("NUL bytes", b"\0" * 100)
    deep = 20_000  # far past Python's recursion limit, which the parsers recurse under
    toml("ignore = " + "[" * deep + "]" * deep, "TOML arrays nested 20000 deep")
    toml("a = " + "{b = " * deep + "1" + "}" * deep, "TOML tables nested 20000 deep")
    yaml("ignore: " + "[" * deep + "]" * deep, "YAML lists nested 20000 deep", huge=True)
    yaml("ignore: " + "{a: " * deep + "1" + "}" * deep, "YAML mappings nested 20000 deep", huge=True)
    laughs = "".join(f"  - &l{i} [" + ", ".join([f"*l{i - 1}" if i else "lol"] * 10) + "]\n" for i in range(12))
    yaml("ignore:\n" + laughs, "YAML billion laughs under a valid key", huge=True)
    yaml("".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "lol"] * 10) + "]\n" for i in range(12)),
         "YAML billion laughs at the top level", huge=True)  # fmt: skip
    yaml("ignore: [&s " + "x" * 65536 + ", " + "*s, " * 20000 + "]\n", "YAML alias repeating 64 KiB", huge=True)
    yaml("ignore: &a [*a]\n", "YAML self-referencing alias")
    yaml("tensor-type: &a [x=q4_0]\nignore: *a\nexclude-weights: {<<: *a}\n", "YAML merge key of a list")
    for key in ("target-sise", "targetsize", "help", "version", "positionals", "Dry-Run", '""', "tensor-type.x"):
        toml(f"{key} = 1\n", f"key {key}")
    for text in ("1: x", "null: x", "true: x", "? [a, b]\n: c", "- dry-run", "dry-run", "42", "--- {}\n--- {}"):
        yaml(f"{text}\n")
    for text in (
        "target-size = {value = '1MB'}", "tensor-type = [['attn_q=q8_0']]", "target-size = ['1MB', '2MB']",
        "dry-run = 'yes'", "dry-run = 1", "target-bpw = true", "target-bpw = 'abc'", "objective = 'best'",
        "sample-rows = 1.5", "target-size = 1979-05-27", "seed = 12:30:00", "ignore = [{a = 1}]",
        "dry-run = true\ndry_run = true", "dry-run = true\ndry-run = true", "target-bpw = 6\ntarget-size = '1MB'",
        "input = ['a', 'b']", "config = 'job.toml'", "config = 'other.toml'",
    ):  # fmt: skip
        toml(text + "\n")
    refused = ("tensor-type = ['attn_q']", "prune-layers = 'a,b'", "output-tensor-type = 'Q9_K'", "override-kv = 'a'")
    for text in refused:
        case(f"TOML {shown(text)}, refused by the job", text.encode(), positional=(MODEL, OUT, "Q4_K"))
    case("TOML candidates = 'Q9_K', refused by the job", b"candidates = 'Q9_K'\ntarget-bpw = 6\n")
    for text in (
        "target-size:", "dry-run: yes please", "target-size: 2001-12-14", "imatrix: !!binary aGVsbG8=",
        "dry-run: !!python/object/apply:os.system [echo hacked]", "seed: " + "9" * 5000, "ignore: [[a]]",
        "config: job.yaml", "sample-rows: 0x", "target-bpw: .inf",
    ):  # fmt: skip
        yaml(text + "\n")
    return cases


CASES = [*model_cases(), *imatrix_cases(), *state_cases(), *option_cases(), *config_cases()]
BY_NAME = {f"{case.category}: {case.name}": case for case in CASES}
assert len(BY_NAME) == len(CASES), [
    name for name, n in Counter(f"{c.category}: {c.name}" for c in CASES).items() if n > 1
]


# ---------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------


def run_cli(argv: tuple[str, ...]) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of one in-process `bpwopt ARGV`; argparse's exit becomes its status."""
    stderr = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(list(argv))
        except SystemExit as exit_:
            status = exit_.code
    return status, stderr.getvalue(), time.monotonic() - started


def directory_contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


@pytest.fixture(scope="module")
def valid_inputs(tmp_path_factory) -> dict[str, bytes]:
    """The valid files every case starts from; the state is measured once on the tiny model."""
    directory = tmp_path_factory.mktemp("valid")
    inputs = {MODEL: MODEL_BYTES, IMATRIX: IMATRIX_BYTES, LEGACY: LEGACY_BYTES}
    for name, data in inputs.items():
        (directory / name).write_bytes(data)
    state = directory / STATE
    argv = ["--quiet", "--dry-run", "--target-bpw", "6", "--state-file", str(state), str(directory / MODEL)]
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    assert state.stat().st_size >= 7 * 4096  # the truncation cases cut inside its first pages
    return {**inputs, STATE: state.read_bytes()}


def check_case(case: Case, directory: Path, valid_inputs: dict[str, bytes]) -> list[str]:
    """Run every command of the case in directory; returns the messages printed (empty for controls)."""
    files = case.files(valid_inputs)
    messages = []
    for argv in case.runs:
        for leftover in directory.iterdir():
            leftover.unlink()
        for name, data in files.items():
            (directory / name).write_bytes(data)
        status, stderr, seconds = run_cli(argv)
        assert "Traceback" not in stderr, stderr
        assert seconds < SECONDS_PER_CASE, f"{argv} took {seconds:.1f} s"
        if case.expected == "ok":
            assert status == 0, stderr
            continue
        lines = stderr.splitlines()
        if case.expected == "usage":
            assert status == 2 and lines[0].startswith("usage: bpwopt"), stderr
            assert re.match(r"bpwopt( inspect)?: error: ", lines[-1]), stderr
        else:
            assert status == 1 and len(lines) == 1 and lines[0].startswith("bpwopt: error: "), stderr
        assert directory_contents(directory) == files, "an input was changed or an output left behind"
        messages.append(lines[-1])
    return messages


@pytest.mark.parametrize("name", list(BY_NAME))
def test_hostile_input(name, valid_inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_case(BY_NAME[name], tmp_path, valid_inputs)


FILE_KINDS = ("gguf model", "imatrix (GGUF)", "imatrix (.dat)", "state file")


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_the_commands_that_refuse_a_damaged_file_accept_the_undamaged_one(kind, valid_inputs, tmp_path, monkeypatch):
    """A refusal is the damage's doing, not the command's: each command the cases run exits 0 on the valid files."""
    monkeypatch.chdir(tmp_path)
    runs = {argv for case in CASES if case.category == kind and case.expected != "ok" for argv in case.runs}
    runs -= {argv for argv in runs if {".", "absent.gguf"} & set(argv)}  # a directory or a missing file: no valid twin
    assert runs, f"no {kind} case left"
    check_case(Case(f"{kind}, undamaged", kind, tuple(sorted(runs)), "ok", dict), tmp_path, valid_inputs)


MESSAGES = {  # case -> what its one line must say
    "gguf model: tensor count 9223372036854775808": "tensor count 9,223,372,036,854,775,808 cannot fit",
    "gguf model: 5 dimensions": "expected 1 to 4",
    "gguf model: unknown ggml type 43": "unknown ggml type 43",
    "gguf model: a duplicate tensor name": "duplicate tensor name blk.0.attn_q.weight",
    "gguf model: last tensor's data offset moved by 4": "has data offset",
    "gguf model: a NaN in an F32 weight": "tensor 'blk.0.attn_q.weight' has invalid data: NaN or infinite values",
    "gguf model: a NaN in a copied F32 norm": "tensor 'blk.0.attn_norm.weight' has invalid data",
    "imatrix (.dat): entries of another model": "another model",
    "imatrix (GGUF): a negative sum in in_sum2": "negative values",
    "imatrix (GGUF): a NaN count": "has a negative or non-finite count",
    "imatrix (GGUF): sums in 2 rows with 1 count": "has 1 counts for 2 rows of sums",
    "imatrix (.dat): a negative ncall": "collected -3 times",
    "state file: measured for another model": "was measured for another model",
    "state file: a trigger that aborts inserts": "it has a trigger",
    "command line: --ignore 'a{99999999999}'": "repetition number is too large",
}


@pytest.mark.parametrize("name", list(MESSAGES))
def test_error_messages_name_the_problem(name, valid_inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [first, *_] = check_case(BY_NAME[name], tmp_path, valid_inputs)
    assert MESSAGES[name] in first


ALLOCATION_CASES = [name for name, case in BY_NAME.items() if case.huge]

# The child: sets the limit first, then loads this module and runs the named cases, one JSON line each.
_LIMITED_RUNNER = """
import contextlib, importlib.util, json, os, resource, signal, sys, tempfile
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
spec = importlib.util.spec_from_file_location("corpus", {module!r})
corpus = sys.modules["corpus"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(corpus)
valid = {{name: bytes.fromhex(data) for name, data in json.loads(sys.stdin.readline()).items()}}

class Hung(BaseException):  # not an OSError, which bpwopt would report as an unreadable file
    pass

def timed_out(signum, frame):
    raise Hung(f"more than {seconds} s")

signal.signal(signal.SIGALRM, timed_out)
for name in json.loads(sys.stdin.readline()):
    with tempfile.TemporaryDirectory() as directory:
        os.chdir(directory)
        signal.alarm({seconds})
        try:
            corpus.check_case(corpus.BY_NAME[name], Path(directory), valid)
            outcome = "ok"
        except BaseException as error:  # MemoryError, Hung, a failed assertion
            outcome = f"{{type(error).__name__}}: {{str(error)[:300]}}"
        signal.alarm(0)
        os.chdir("/")
    print(json.dumps([name, outcome]), flush=True)
"""


def test_no_count_in_a_header_is_trusted_under_a_2_gib_address_space(valid_inputs):
    """The cases with huge counts and sizes, again in a child process that cannot map more than 2 GiB."""
    assert len(ALLOCATION_CASES) >= 50
    script = _LIMITED_RUNNER.format(limit=ADDRESS_SPACE_LIMIT, module=__file__, seconds=SECONDS_PER_CASE)
    stdin = json.dumps({name: data.hex() for name, data in valid_inputs.items()}) + "\n" + json.dumps(ALLOCATION_CASES)
    result = subprocess.run(
        [sys.executable, "-c", script], input=stdin + "\n", capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    outcomes = dict(json.loads(line) for line in result.stdout.splitlines())
    assert len(outcomes) == len(ALLOCATION_CASES), result.stderr[-3000:]
    failures = {name: outcome for name, outcome in outcomes.items() if outcome != "ok"}
    assert not failures


def corpus_summary() -> dict[str, dict[str, int]]:
    """Cases per category and expected outcome, for benchmarks/RESULTS.md."""
    summary: dict[str, dict[str, int]] = {}
    for case in CASES:
        summary.setdefault(case.category, Counter())[case.expected] += 1
    return {category: dict(counts) for category, counts in summary.items()}


if __name__ == "__main__":
    print(json.dumps(corpus_summary(), indent=2), len(ALLOCATION_CASES), "cases also run under the 2 GiB limit")
