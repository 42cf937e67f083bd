"""Every command on every input kind the product takes: each cell asserts a real outcome or a one-line refusal.

Inputs are tiny synthetic Llamas (tests/synthetic_models.py) in every source
form a user brings: F32 (llama-quantize's own starting point), F16, BF16,
Q8_0, a K-quant file (bpwopt's drop-in Q4_K_M of the F16 one, requantized
with --allow-requantize), a two-shard split, an MoE, and a model with its own
output.weight beside the tied ones; the optimizer and calibrate run with and
without an imatrix. Written files must load and evaluate in llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from bpwopt.cli.main import main
from bpwopt.state.store import StateFile, read_identity
from tests.synthetic_models import write_imatrix, write_tiny_llama
from tests.test_splits import gguf_split

pytestmark = pytest.mark.slow  # end to end through llama.cpp; CI runs it (the README's test command runs all)

INPUTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "split", "moe", "untied")
QUANTIZED = {"q8_0", "q4_k_m"}  # sources llama-quantize requantizes only with --allow-requantize
SAMPLE = ["--sample-rows", "64"]
TEXT_WINDOWS = ["--ctx", "64", "--chunks", "2"]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Input kind -> the model's path (the first shard for the split one)."""
    folder = tmp_path_factory.mktemp("matrix-models")
    paths = {kind: write_tiny_llama(folder / f"{kind}.gguf", getattr(Q, kind.upper()))
             for kind in ("f32", "f16", "bf16", "q8_0")}  # fmt: skip
    paths["moe"] = write_tiny_llama(folder / "moe.gguf", Q.F16, moe=True)
    paths["untied"] = write_tiny_llama(folder / "untied.gguf", Q.F16, tied=False)
    assert main(["--quiet", str(paths["f16"]), str(folder / "q4_k_m.gguf"), "Q4_K_M"]) == 0
    paths["q4_k_m"] = folder / "q4_k_m.gguf"
    paths["split"] = gguf_split(paths["untied"], folder / "split", tensors_per_shard=12)[0]
    return paths


@pytest.fixture(scope="session")
def imatrices(models, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("matrix-imatrices")
    return {kind: write_imatrix(folder / f"{kind}.imatrix.gguf", path) for kind, path in models.items()}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BPWOPT_CACHE", str(tmp_path / "cache"))


def run(capsys, *argv: str | Path) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def succeed(capsys, *argv: str | Path) -> str:
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    return out


def requantize(kind: str) -> list[str]:
    return ["--allow-requantize"] if kind in QUANTIZED else []


def assert_loads_and_evaluates(path: Path) -> None:
    """llama.cpp loads the file and gives finite, varying logits for every token of a short text."""
    model = llama_cpp.Llama(str(path), n_ctx=128, verbose=False, logits_all=True)
    model.eval(model.tokenize(b"the of and to in"))
    logits = np.asarray(model.scores[: model.n_tokens])
    assert np.isfinite(logits).all() and logits.std() > 0
    model.close()


def measured_state(capsys, models, imatrices, kind: str, folder: Path, imatrix: bool = False) -> Path:
    """A state holding every varied tensor's measurements, made by a dry run."""
    state = folder / f"{kind}.bpw_state"
    extra = ["--imatrix", imatrices[kind]] if imatrix else []
    summary = json.loads(succeed(capsys, "--quiet", "--json", "--dry-run", *requantize(kind), *SAMPLE, *extra,
                                 "--target-bpw", "4.5", "--state-file", state, models[kind]))  # fmt: skip
    assert summary["measured"] > 0
    return state


@pytest.mark.parametrize("kind", INPUTS)
def test_inspect(kind, models, capsys):
    summary = json.loads(succeed(capsys, "inspect", "--json", models[kind]))
    assert summary["architecture"] == "llama" and summary["shards"] == (2 if kind == "split" else 1)
    assert summary["total"]["tensors"] == len(summary["tensors"]) and summary["total"]["bytes"] > 0


@pytest.mark.parametrize("kind", INPUTS)
def test_preset(kind, models, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    succeed(capsys, "--quiet", *requantize(kind), models[kind], out, "Q4_K_M")
    assert_loads_and_evaluates(out)


@pytest.mark.parametrize("kind", sorted(QUANTIZED))
def test_requantizing_without_the_flag_is_a_one_line_refusal(kind, models, tmp_path, capsys):
    # Q5_K_M: a type the source does not hold (a file already in the target types is only copied, as by llama.cpp)
    out = tmp_path / "o.gguf"
    for argv in ([models[kind], out, "Q5_K_M"], ["--target-bpw", "4.5", models[kind], out]):
        status, _, err = run(capsys, "--quiet", *argv)
        assert status == 1 and err.count("\n") == 1 and err.startswith("bpwopt: error: requantizing"), err
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("kind", INPUTS)
def test_target_bpw_dry_run_json_then_target_size_writes_what_it_planned(kind, imatrix, models, imatrices, tmp_path,
                                                                        capsys):  # fmt: skip
    extra = [*requantize(kind), *SAMPLE, *(["--imatrix", imatrices[kind]] if imatrix else [])]
    state = tmp_path / "s.bpw_state"
    plan = json.loads(succeed(capsys, "--quiet", "--json", "--dry-run", "--target-bpw", "4.5", "--state-file", state,
                              *extra, models[kind]))  # fmt: skip
    assert plan["bits_per_weight"] <= 4.5 and plan["measured"] > 0 and not plan["written"]
    with StateFile.open(state, read_identity(state), create=False) as opened:
        measured_tensors = {name for name, _ in opened.measurements()}
        assert measured_tensors == {t["name"] for t in plan["tensors"] if t["varied"]}
        assert (opened.identity.imatrix_sha256 is not None) == imatrix
    out = tmp_path / "out.gguf"
    # intermixed: IN OUT first, then the options, as Python command lines allow
    written = json.loads(succeed(capsys, models[kind], out, "--json", "--quiet", "--target-size",
                                 str(plan["file_bytes"] + 4096), "--state-file", state, *extra))  # fmt: skip
    assert written["measured"] == 0 and out.stat().st_size == written["file_bytes"] <= plan["file_bytes"] + 4096
    assert_loads_and_evaluates(out)


@pytest.mark.parametrize("kind", ["f32", "q4_k_m", "split", "moe"])
def test_a_config_file_runs_the_job(kind, models, tmp_path, capsys):
    config = tmp_path / "job.toml"
    lines = ["target-bpw = 4.5", "sample-rows = 64", "quiet = true", f'input = "{models[kind]}"',
             f'output = "{tmp_path / "out.gguf"}"', *(["allow-requantize = true"] if kind in QUANTIZED else [])]
    config.write_text("\n".join(lines) + "\n")
    succeed(capsys, "--config", config)
    assert_loads_and_evaluates(tmp_path / "out.gguf")


@pytest.mark.parametrize("kind", INPUTS)
def test_eval(kind, models, tmp_path, capsys):
    quant = tmp_path / "q.gguf"
    succeed(capsys, "--quiet", *requantize(kind), models[kind], quant, "Q4_0")
    result = json.loads(succeed(capsys, "eval", "--json", *TEXT_WINDOWS, models[kind], quant))
    assert result["mean_kld"] > 0 and result["tokens"] > 0


@pytest.mark.parametrize(("kind", "imatrix"), [("f32", False), ("f32", True), ("f16", True), ("bf16", False),
                                               ("q8_0", False), ("q4_k_m", True), ("split", False), ("moe", True),
                                               ("untied", False)])  # fmt: skip
def test_calibrate_then_plot(kind, imatrix, models, imatrices, tmp_path, capsys):
    state = measured_state(capsys, models, imatrices, kind, tmp_path, imatrix)
    extra = ["--imatrix", imatrices[kind]] if imatrix else []
    report = json.loads(succeed(capsys, "calibrate", models[kind], "--state-file", state, *extra, "--json", "--quiet",
                                "--groups", "class", "--only", "attn_v", *TEXT_WINDOWS))  # fmt: skip
    assert [g["key"] for g in report["groups"]] == ["attn_v"] and report["weights"]["attn_v"] > 0
    with StateFile.open(state, read_identity(state), create=False) as opened:
        assert opened.values("weights")["attn_v"] == pytest.approx(report["weights"]["attn_v"])
    written = succeed(capsys, "plot", state, "--out", tmp_path / "plots", "--model", models[kind], "--format", "png")
    paths = [Path(line) for line in written.splitlines()]
    assert {p.name for p in paths} >= {"tradeoff.png", "tensor-errors.png"}
    assert all(p.stat().st_size > 0 for p in paths)


@pytest.mark.parametrize("kind", ["f32", "q4_k_m", "moe"])
def test_tune_one_trial(kind, models, imatrices, tmp_path, capsys):
    state = measured_state(capsys, models, imatrices, kind, tmp_path)
    argv = ["tune", models[kind], "--state-file", state, *requantize(kind), *SAMPLE, "--target-bpw", "4.5"]
    report = json.loads(succeed(capsys, *argv, "--trials", "1", "--json", "--quiet", *TEXT_WINDOWS))
    assert report["trials"] == 1 and report["chosen"]["number"] == 0  # the one trial is the untuned one

