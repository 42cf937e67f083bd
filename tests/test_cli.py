"""The command line itself: argument order, and what a user sees when bpwopt has a bug."""

from __future__ import annotations

import importlib
import json

import pytest

from bpwopt.cli.main import EXIT_INTERNAL_ERROR, main, parse_positionals, parse_quantize_args

cli = importlib.import_module("bpwopt.cli.main")  # the module: the package's `main` attribute is the function

LLAMA_QUANTIZE_ORDER = ["--allow-requantize", "--target-size", "80MB", "--dry-run", "in.gguf", "out.gguf", "Q4_K_M",
                        "2"]  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["in.gguf", "out.gguf", "--target-size", "80MB", "Q4_K_M", "2", "--allow-requantize", "--dry-run"],
        ["in.gguf", "--allow-requantize", "out.gguf", "--target-size", "80MB", "Q4_K_M", "--dry-run", "2"],
        ["--dry-run", "in.gguf", "out.gguf", "Q4_K_M", "--target-size", "80MB", "2", "--allow-requantize"],
    ],
    ids=["positionals-first", "interleaved", "options-around"],
)
def test_options_and_positionals_in_any_order_mean_what_llama_quantizes_order_means(argv):
    expected = parse_quantize_args(LLAMA_QUANTIZE_ORDER)
    args = parse_quantize_args(argv)
    assert vars(args) == vars(expected)
    where = parse_positionals(args.positionals, has_target=True)
    assert (str(where.input_path), str(where.output_path), where.type_text, where.threads) == (
        "in.gguf", "out.gguf", "Q4_K_M", 2,
    )  # fmt: skip


def test_a_target_with_threads_after_the_options_is_read_as_threads():
    # the issue's own case: `bpwopt IN OUT --target-size S 2` used to stop with "unrecognized arguments: 2"
    args = parse_quantize_args(["in.gguf", "out.gguf", "--target-size", "1GB", "2"])
    where = parse_positionals(args.positionals, has_target=True)
    assert (where.output_path.name, where.type_text, where.threads) == ("out.gguf", None, 2)


def _break_inspect(monkeypatch):
    def broken(path):
        raise RuntimeError("an invariant failed\nsecond line of detail")

    monkeypatch.setattr(cli, "inspect_gguf", broken)


def test_an_internal_error_is_one_line_naming_it_and_where_its_traceback_was_saved(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("BPWOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BPWOPT_DEBUG", raising=False)
    _break_inspect(monkeypatch)
    assert main(["inspect", "model.gguf"]) == EXIT_INTERNAL_ERROR
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    # where: the innermost frame of bpwopt's own code (the broken function lives in the tests)
    assert line.startswith("bpwopt: internal error: RuntimeError: an invariant failed in _inspect (bpwopt/cli/main.py:")
    (saved,) = (tmp_path / "cache" / "crashes").iterdir()
    assert f"traceback saved to {saved} (rerun with --debug to see it)" in line
    text = saved.read_text()
    assert text.startswith("Traceback (most recent call last):") and "second line of detail" in text
    assert "in _inspect" in text  # the whole stack, not only the last frame


def test_an_unsavable_traceback_still_gives_one_line(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("BPWOPT_CACHE", str(blocker))
    monkeypatch.delenv("BPWOPT_DEBUG", raising=False)
    _break_inspect(monkeypatch)
    assert main(["inspect", "model.gguf"]) == EXIT_INTERNAL_ERROR
    (line,) = capsys.readouterr().err.splitlines()
    assert "could not save its traceback" in line and line.endswith("rerun with --debug to see it")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback_instead(monkeypatch, tmp_path, how):
    monkeypatch.setenv("BPWOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BPWOPT_DEBUG", "1" if how == "environment" else "0")
    _break_inspect(monkeypatch)
    with pytest.raises(RuntimeError, match="an invariant failed"):
        main(["inspect", "model.gguf", *(["--debug"] if how == "flag" else [])])
    assert not (tmp_path / "cache").exists()


def test_a_users_mistake_stays_a_one_line_error_without_a_saved_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("BPWOPT_CACHE", str(tmp_path / "cache"))
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("bpwopt: error:")
    assert not (tmp_path / "cache").exists()


def test_a_size_list_writes_a_ladder_from_one_measurement(tmp_path, capsys):
    from tests.synthetic_models import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny.gguf")
    whole = model.stat().st_size
    sizes = [whole * 20 // 100, whole * 40 // 100]  # F16 in: about Q3 and Q6 sizes
    argv = ["--quiet", "--json", "--sample-rows", "64", "--target-size", f"{sizes[0]},{sizes[1]}",
            str(model), str(tmp_path / "out.gguf")]  # fmt: skip
    assert main(argv) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert [s["output_path"] for s in summaries] == [str(tmp_path / f"out-{size}.gguf") for size in sizes]
    assert [s["file_bytes"] for s in summaries] == [(tmp_path / f"out-{size}.gguf").stat().st_size for size in sizes]
    assert all(s["file_bytes"] <= size for s, size in zip(summaries, sizes, strict=True))
    assert summaries[0]["measured"] > 0 and summaries[1]["measured"] == 0  # the second rung reuses the first's
    assert summaries[1]["reused"] == summaries[0]["measured"]


def test_a_ladder_with_keep_split_is_refused(tmp_path, capsys):
    argv = ["--keep-split", "--target-size", "1mb,2mb", str(tmp_path / "in.gguf"), str(tmp_path / "out.gguf")]
    assert main(argv) == 1
    message = "bpwopt: error: --keep-split writes one model's shards; give one --target-size with it"
    assert capsys.readouterr().err.strip() == message
