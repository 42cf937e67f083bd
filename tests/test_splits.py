"""Split models: a gguf-split input read whole, one output or --keep-split shards, as llama.cpp does.

The split input is built here from the demo model the way llama.cpp's
gguf-split (--split-max-tensors 100) writes it: 272 tensors in file order
become 3 shards; the first carries all metadata, every shard split.no,
split.count and split.tensors.count. llama.cpp itself is the oracle: it
loads that input, and its llama_model_quantize output is compared tensor by
tensor and key by key with bpwopt's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from gguf import GGUFValueType

from bpwopt.cli.main import main
from bpwopt.errors import BpwoptError
from bpwopt.formats import gguf_writer
from bpwopt.formats.gguf_writer import GGUFLayout, TensorSlot, copied_kv, encode_kv, write_gguf, write_gguf_files
from bpwopt.formats.splits import open_model, split_path
from bpwopt.quality import calibrate
from bpwopt.source.rows import tensor_rows
from tests.test_dropin import assert_same_file, llama_quantize

pytestmark = pytest.mark.slow  # split models against llama-quantize and gguf-split

TENSORS_PER_SHARD = 100
PROMPT = "The capital of France is"


def gguf_split(source: Path, prefix: Path, tensors_per_shard: int = TENSORS_PER_SHARD) -> list[Path]:
    """source cut into shards as `gguf-split --split-max-tensors N source prefix` writes them."""
    reader = gguf.GGUFReader(source)
    tensors = reader.tensors
    groups = [tensors[start : start + tensors_per_shard] for start in range(0, len(tensors), tensors_per_shard)]
    metadata = [copied_kv(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")]
    paths = []
    for index, group in enumerate(groups):
        split_keys = [
            encode_kv("split.no", GGUFValueType.UINT16, index),
            encode_kv("split.count", GGUFValueType.UINT16, len(groups)),
            encode_kv("split.tensors.count", GGUFValueType.INT32, len(tensors)),
        ]
        slots = [TensorSlot(t.name, tuple(int(n) for n in t.shape), t.tensor_type, int(t.n_bytes)) for t in group]
        path = split_path(prefix, index, len(groups))
        kv_entries = metadata + split_keys if index == 0 else split_keys
        write_gguf(path, kv_entries, slots, lambda i, group=group: [tensor_rows(group[i])])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def shards(demo_model_path, tmp_path_factory) -> list[Path]:
    return gguf_split(demo_model_path, tmp_path_factory.mktemp("split") / "smollm2")


def greedy_text(model_path: Path) -> str:
    llm = llama_cpp.Llama(str(model_path), n_ctx=128, verbose=False)
    return llm(PROMPT, max_tokens=8, temperature=0)["choices"][0]["text"]


def test_the_split_input_is_what_gguf_split_writes_and_llama_cpp_loads_it(demo_model_path, shards):
    assert [path.name for path in shards] == [f"smollm2-0000{k}-of-00003.gguf" for k in (1, 2, 3)]
    readers = [gguf.GGUFReader(path) for path in shards]
    assert [len(reader.tensors) for reader in readers] == [100, 100, 72]
    split_keys = ["split.no", "split.count", "split.tensors.count"]
    assert list(readers[0].fields)[-3:] == split_keys
    assert [list(reader.fields)[3:] for reader in readers[1:]] == [split_keys, split_keys]  # after GGUF.* counts
    assert greedy_text(shards[0]) == greedy_text(demo_model_path)


def test_split_input_is_read_and_inspected_whole(demo_model_path, shards, capsys):
    model = open_model(shards[0])
    whole = gguf.GGUFReader(demo_model_path)
    assert model.paths == tuple(shards)
    assert [t.name for t in model.tensors] == [t.name for t in whole.tensors]
    assert model.shard_of["blk.0.attn_v.weight"] == 0 and model.shard_of["output_norm.weight"] == 2
    assert main(["inspect", "--json", str(shards[0])]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == 3 and summary["file_bytes"] == sum(path.stat().st_size for path in shards)
    assert summary["total"]["tensors"] == 272 and summary["total"]["bytes"] == sum(t.n_bytes for t in whole.tensors)


def test_split_input_to_one_file_matches_llama_quantize(shards, tmp_path):
    theirs = llama_quantize(shards[0], tmp_path / "llama.gguf", "Q4_K_M")
    assert main(["--allow-requantize", "--quiet", str(shards[0]), str(tmp_path / "ours.gguf"), "Q4_K_M"]) == 0
    ours = gguf.GGUFReader(tmp_path / "ours.gguf")
    assert_same_file(ours, theirs)
    assert not any(key.startswith("split.") for key in ours.fields)


def test_keep_split_matches_llama_quantize_shard_by_shard(shards, tmp_path):
    llama_quantize(shards[0], tmp_path / "llama", "Q4_K_M", keep_split=True)  # llama-quantize strips OUT's .gguf
    argv = ["--allow-requantize", "--quiet", "--keep-split", str(shards[0]), str(tmp_path / "ours.gguf"), "Q4_K_M"]
    assert main(argv) == 0
    theirs = sorted(tmp_path.glob("llama-*.gguf"))
    ours = sorted(tmp_path.glob("ours-*.gguf"))
    assert [p.name.removeprefix("ours") for p in ours] == [p.name.removeprefix("llama") for p in theirs]
    assert len(ours) == 3
    for mine, reference in zip(ours, theirs, strict=True):
        assert_same_file(gguf.GGUFReader(mine), gguf.GGUFReader(reference))
        assert key_order(mine) == key_order(reference)
    assert [t.name for t in open_model(ours[0]).tensors] == [t.name for t in open_model(shards[0]).tensors]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in ours + theirs)


def key_order(path: Path) -> list[str]:
    return [key for key in gguf.GGUFReader(path).fields if not key.startswith("bpwopt.")]


def test_keep_split_of_one_file_writes_one_numbered_shard_as_llama_quantize_does(demo_model_path, tmp_path):
    llama_quantize(demo_model_path, tmp_path / "llama", "Q8_0", keep_split=True)
    argv = ["--allow-requantize", "--quiet", "--keep-split", str(demo_model_path), str(tmp_path / "ours.gguf"), "Q8_0"]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-00001-of-00001.gguf", "ours-00001-of-00001.gguf"]
    ours, theirs = tmp_path / "ours-00001-of-00001.gguf", tmp_path / "llama-00001-of-00001.gguf"
    assert_same_file(gguf.GGUFReader(ours), gguf.GGUFReader(theirs))
    assert not any(key.startswith("split.") for key in key_order(ours))


def rewritten(shard: Path, destination: Path, key: str, value_type: GGUFValueType, old: int, new: int) -> Path:
    """A copy of shard with one split key's value changed."""
    data = shard.read_bytes()
    before, after = encode_kv(key, value_type, old), encode_kv(key, value_type, new)
    assert data.count(before) == 1
    destination.write_bytes(data.replace(before, after))
    return destination


def assert_refused(shards: list[Path], tmp_path: Path, capsys, message: str, replace: dict[int, Path | None]) -> None:
    """The split set of shards with some replaced (None: left out) gives one line, exit 1 and no output."""
    folder = tmp_path / "in"
    folder.mkdir()
    for index, shard in enumerate(shards):
        chosen = replace.get(index, shard)
        if chosen is not None:
            os.symlink(chosen, folder / shard.name)
    assert main(["--allow-requantize", str(folder / shards[0].name), str(tmp_path / "out.gguf"), "Q4_K_M"]) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert not list(tmp_path.glob("out*"))


def test_a_missing_shard_is_refused(shards, tmp_path, capsys):
    assert_refused(shards, tmp_path, capsys, "missing shard 2 of 3", {1: None})


def test_a_shard_with_another_number_is_refused(shards, tmp_path, capsys):
    renumbered = rewritten(shards[1], tmp_path / "x.gguf", "split.no", GGUFValueType.UINT16, 1, 2)
    assert_refused(shards, tmp_path, capsys, "split.no is 2, expected 1", {1: renumbered})


def test_a_shard_of_another_count_is_refused(shards, tmp_path, capsys):
    recounted = rewritten(shards[2], tmp_path / "x.gguf", "split.count", GGUFValueType.UINT16, 3, 4)
    assert_refused(shards, tmp_path, capsys, "split.count is 4, expected 3", {2: recounted})


def test_a_tensor_count_that_does_not_add_up_is_refused(shards, tmp_path, capsys):
    miscounted = rewritten(shards[0], tmp_path / "x.gguf", "split.tensors.count", GGUFValueType.INT32, 272, 271)
    message = "split.tensors.count is 271, the 3 shards hold 272 tensors"
    assert_refused(shards, tmp_path, capsys, message, {0: miscounted})


def test_a_tensor_in_two_shards_is_refused(shards, tmp_path, capsys):
    second_again = rewritten(shards[1], tmp_path / "x.gguf", "split.no", GGUFValueType.UINT16, 1, 2)
    assert_refused(shards, tmp_path, capsys, "tensor blk.19.attn_norm.weight is in both", {2: second_again})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{s1}", "{tmp}/out.gguf", "Q4_K_M"], "is shard 2 of a split model of 3, not its first; give {s0}"),
        (["{renamed}", "{tmp}/out.gguf", "Q4_K_M"], "must be named PREFIX-00001-of-00003.gguf"),
        (["--keep-split", "{s0}", "{prefix}.gguf", "Q4_K_M"], "input and output files are the same: {s0}"),
        (["--override-kv", "split.count=int:2", "{s0}", "{tmp}/out.gguf", "Q4_K_M"], "cannot be overridden"),
    ],
)
def test_misnamed_split_input_or_output_is_refused(shards, tmp_path, capsys, arguments, message):
    renamed = tmp_path / "renamed.gguf"
    os.symlink(shards[0], renamed)
    prefix = shards[0].parent / "smollm2"
    names = {"s0": shards[0], "s1": shards[1], "renamed": renamed, "tmp": tmp_path, "prefix": prefix}
    argv = [a.format(**names) for a in arguments]
    assert main(["--allow-requantize", *argv]) == 1
    error = capsys.readouterr().err
    assert message.format(**names) in error and error.count("\n") == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["renamed.gguf"]
    assert all(shard.stat().st_size > 1_000_000 for shard in shards)


def test_optimizer_on_a_split_input_hits_its_target_with_and_without_keep_split(shards, tmp_path, capsys):
    target = 100_000_000
    common = ["--allow-requantize", "--json", "--sample-rows", "64", "--candidates", "Q4_0,Q5_0,Q8_0"]
    common += ["--state-file", str(tmp_path / "s.bpw_state"), "--target-size", str(target), str(shards[0])]
    assert main([*common, str(tmp_path / "one.gguf")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert 0.99 * target <= one["file_bytes"] == (tmp_path / "one.gguf").stat().st_size <= target
    assert main(["--keep-split", *common, str(tmp_path / "split.gguf")]) == 0
    split = json.loads(capsys.readouterr().out)
    written = sorted(tmp_path.glob("split-*.gguf"))
    assert [p.name for p in written] == [f"split-0000{k}-of-00003.gguf" for k in (1, 2, 3)]
    assert split["measured"] == 0 and split["shards"] == 3 and split["output_path"] == str(written[0])
    assert 0.99 * target <= split["file_bytes"] == sum(p.stat().st_size for p in written) <= target
    assert greedy_text(written[0]).strip()


def three_shards(tmp_path: Path) -> tuple[list[Path], list[GGUFLayout]]:
    """Paths of a 3-shard output, each holding an earlier run's file, and a layout of one small tensor per shard."""
    paths = [split_path(tmp_path / "m", index, 3) for index in range(3)]
    for path in paths:
        path.write_bytes(b"an earlier run's shard")
    slot = TensorSlot("t", (64,), gguf.GGMLQuantizationType.F32, 256)
    return paths, [GGUFLayout([], [slot]) for _ in paths]


def zeros(file: int, index: int) -> list[np.ndarray]:
    return [np.zeros(256, np.uint8)]


def test_a_failure_in_any_shard_keeps_every_earlier_shard(tmp_path):
    paths, layouts = three_shards(tmp_path)

    def failing_in_the_last(file: int, index: int) -> list[np.ndarray]:
        if file == 2:
            raise BpwoptError("cannot quantize")
        return zeros(file, index)

    with pytest.raises(BpwoptError):
        write_gguf_files(paths, layouts, failing_in_the_last)
    assert [path.read_bytes() for path in paths] == [b"an earlier run's shard"] * 3
    assert sorted(tmp_path.iterdir()) == paths


def test_a_run_killed_between_shard_renames_leaves_no_first_shard_and_a_rerun_completes(tmp_path, monkeypatch):
    paths, layouts = three_shards(tmp_path)
    rename = os.replace

    def killed_before_the_first(source, destination):
        if Path(destination) == paths[0]:
            raise KeyboardInterrupt
        rename(source, destination)

    monkeypatch.setattr(gguf_writer.os, "replace", killed_before_the_first)
    with pytest.raises(KeyboardInterrupt):
        write_gguf_files(paths, layouts, zeros)
    # the later shards are this run's; the first, through which llama.cpp opens the set, is neither old nor new
    assert not paths[0].exists() and all(path.read_bytes()[:4] == b"GGUF" for path in paths[1:])
    monkeypatch.setattr(gguf_writer.os, "replace", rename)
    assert write_gguf_files(paths, layouts, zeros) == sum(path.stat().st_size for path in paths)
    assert sorted(tmp_path.iterdir()) == paths and paths[0].read_bytes()[:4] == b"GGUF"


def test_calibrate_and_plot_accept_the_split_model_their_state_was_measured_from(shards, tmp_path):
    state = tmp_path / "s.bpw_state"
    common = ["--allow-requantize", "--sample-rows", "64", "--candidates", "Q4_0,Q8_0", "--quiet"]
    assert main([*common, "--dry-run", "--state-file", str(state), "--target-bpw", "6", str(shards[0])]) == 0
    arguments = ["--state-file", str(state), "--only", "attn_v@0-9", "--chunks", "1", "--ctx", "64", "--quiet"]
    assert main(["calibrate", str(shards[0]), *arguments]) == 0  # the split model's hash matches its state's
    assert main(["plot", str(state), "--model", str(shards[0]), "--out", str(tmp_path / "plots")]) == 0
    perturbed = tmp_path / "perturbed.gguf"
    noise = calibrate.noise_perturbation(1e-3, seed=0)
    calibrate.write_perturbed(open_model(shards[0]), ["blk.0.attn_v.weight"], perturbed, noise, None)
    assert not {"split.no", "split.count", "split.tensors.count"} & set(gguf.GGUFReader(perturbed).fields)
    assert greedy_text(perturbed).strip()  # one file holding every shard's tensors: llama.cpp loads it


def test_keep_split_shards_follow_the_output_path_rules(shards, tmp_path, capsys):
    """Every shard is checked before the first is written; a shard behind a link replaces the link's target."""
    prefix = tmp_path / "ours"  # llama-quantize drops OUT's .gguf before numbering the shards
    argv = ["--allow-requantize", "--quiet", "--keep-split", str(shards[0]), f"{prefix}.gguf", "Q8_0"]
    second = split_path(prefix, 1, 3)
    second.mkdir()
    assert main(argv) == 1
    assert capsys.readouterr().err == f"bpwopt: error: {second}: is a directory, not an output file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [second.name]  # not even shard 1 was written
    second.rmdir()
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "shard-2.gguf"
    target.write_bytes(b"the user's previous shard")
    second.symlink_to(target)
    assert main(argv) == 0
    assert second.is_symlink() and second.resolve() == target
    written, source = open_model(split_path(prefix, 0, 3)), open_model(shards[0])  # opened whole, the link included
    assert [t.name for t in written.tensors] == [t.name for t in source.tensors]
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["shard-2.gguf"]  # no temporary left
