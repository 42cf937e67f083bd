"""Budgets and the command line's positional arguments."""

from __future__ import annotations

import pytest

from bpwopt.cli.main import Positionals, parse_candidates, parse_positionals
from bpwopt.errors import BpwoptError
from bpwopt.solve.targets import Target, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1.5gb", 1_500_000_000),
        ("1500MB", 1_500_000_000),
        ("800MiB", 800 * 2**20),
        ("2G", 2_000_000_000),
        ("123456", 123_456),
        ("1.5 GB", 1_500_000_000),
        ("3KiB", 3072),
        ("64b", 64),
    ],
)
def test_sizes_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "1.5xb", "0", "-3", "1ib", "inf", "1e400", "1.5 G B"])
def test_malformed_sizes_are_refused(text):
    with pytest.raises(BpwoptError, match="invalid size"):
        parse_size(text)


def test_bpw_budget_never_exceeds_the_target():
    target = Target(bits_per_weight=4.5)
    assert target.data_budget(1001) == 563  # 4.5 × 1001 / 8 = 563.06
    assert 8 * target.data_budget(1001) / 1001 <= 4.5


@pytest.mark.parametrize("bpw", [0.0, -1.0, 33.0, float("nan"), float("inf")])
def test_absurd_bpw_targets_are_refused(bpw):
    with pytest.raises(BpwoptError, match="--target-bpw"):
        Target(bits_per_weight=bpw)


@pytest.mark.parametrize(
    ("arguments", "has_target", "expected"),
    [
        (["in.gguf", "Q4_K_M"], False, Positionals("in.gguf", None, "Q4_K_M", None)),
        (["in.gguf", "out.gguf", "Q4_K_M"], False, Positionals("in.gguf", "out.gguf", "Q4_K_M", None)),
        (["in.gguf", "q4_k_m", "8"], False, Positionals("in.gguf", None, "q4_k_m", 8)),
        (["in.gguf", "out.gguf", "7", "4"], False, Positionals("in.gguf", "out.gguf", "7", 4)),
        (["in.gguf"], True, Positionals("in.gguf", None, None, None)),
        (["in.gguf", "8"], True, Positionals("in.gguf", None, None, 8)),
        (["in.gguf", "out.gguf"], True, Positionals("in.gguf", "out.gguf", None, None)),
        (["in.gguf", "out.gguf", "8"], True, Positionals("in.gguf", "out.gguf", None, 8)),
        (["in.gguf", "Q4_K_M"], True, Positionals("in.gguf", None, "Q4_K_M", None)),
        (["in.gguf", "out.gguf", "Q4_K_M", "2"], True, Positionals("in.gguf", "out.gguf", "Q4_K_M", 2)),
    ],
)
def test_positionals_read_as_llama_quantize_and_the_spec_say(arguments, has_target, expected):
    parsed = parse_positionals(arguments, has_target)
    assert (str(parsed.input_path), parsed.output_path and str(parsed.output_path)) == (
        expected.input_path,
        expected.output_path,
    )
    assert (parsed.type_text, parsed.threads) == (expected.type_text, expected.threads)


@pytest.mark.parametrize(
    ("arguments", "has_target"),
    [(["in.gguf"], False), ([], True), (["a", "b", "c", "d", "e"], True), (["in.gguf", "Q4_0", "many"], False)],
)
def test_wrong_positionals_are_refused(arguments, has_target):
    with pytest.raises(BpwoptError):
        parse_positionals(arguments, has_target)


def test_candidates_are_parsed_case_insensitively_without_duplicates():
    assert [t.name for t in parse_candidates("q4_k, Q6_K,q4_k")] == ["Q4_K", "Q6_K"]


@pytest.mark.parametrize(
    ("text", "message"), [("Q4_K,NVFP4", "cannot produce NVFP4"), ("Q9", "invalid"), (",", "at least")]
)
def test_bad_candidates_are_refused(text, message):
    with pytest.raises(BpwoptError, match=message):
        parse_candidates(text)
