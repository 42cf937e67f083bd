"""Budgets only the i-quants and Q1_0 reach, on Gemma-3-270M with its imatrix.

llama-quantize's README shows `--target-bpw 2.5`; no plan made of Q2_K and up
reaches it on Gemma, whose 168M-weight tied embedding and 640-wide matrices
can take no 256-block type. With the grid i-quants and Q1_0 among the
candidates the target lands, and a plan at the size of llama.cpp's IQ2_M
preset loads and generates in llama.cpp. (The KLD comparison at that size,
from the off-grid F16 base, is benchmarks/quality.py's, in RESULTS.md.)
"""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import pytest

from bpwopt.cli.main import main
from bpwopt.demo import gemma3_path

pytestmark = pytest.mark.slow  # measures every default candidate of Gemma-3-270M (sampled rows)

IMATRIX = Path(__file__).resolve().parents[1] / "data" / "gemma3-270m-offgrid-f16.imatrix.gguf"
SAMPLE = ["--sample-rows", "64"]


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("low-bit") / "gemma3.bpw_state"


def plan(capsys, state: Path, *arguments: str) -> dict:
    argv = ["--allow-requantize", "--json", *SAMPLE, "--imatrix", str(IMATRIX), "--state-file", str(state)]
    assert main([*argv, *arguments]) == 0
    return json.loads(capsys.readouterr().out)


def test_target_bpw_2_5_lands(state, capsys):
    report = plan(capsys, state, "--dry-run", "--target-bpw", "2.5", str(gemma3_path()))
    assert 2.45 < report["bits_per_weight"] <= 2.5
    types = {t["qtype"] for t in report["tensors"] if t["varied"]}
    assert types & {"Q1_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S"}


def test_target_bpw_2_5_is_out_of_reach_without_the_new_types(state, capsys, tmp_path):
    old = "Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,IQ4_XS,IQ4_NL,Q4_0,Q5_0,Q5_1"
    argv = ["--allow-requantize", *SAMPLE, "--imatrix", str(IMATRIX), "--state-file", str(tmp_path / "old.bpw_state")]
    assert main([*argv, "--candidates", old, "--dry-run", "--target-bpw", "2.5", str(gemma3_path())]) == 1
    assert "reachable" in capsys.readouterr().err


def test_plan_at_the_iq2_m_presets_size_fits_it_and_generates(state, capsys, tmp_path):
    preset, out = tmp_path / "iq2_m.gguf", tmp_path / "plan.gguf"
    weights = ["--allow-requantize", "--quiet", "--imatrix", str(IMATRIX)]
    assert main([*weights, str(gemma3_path()), str(preset), "IQ2_M"]) == 0
    size = preset.stat().st_size
    report = plan(capsys, state, "--target-size", str(size), "--check", "off", str(gemma3_path()), str(out))
    assert report["written"] and out.stat().st_size <= size
    # The packaged base is Q4_K_M, whose own types requantize it losslessly, and IQ2_M's fallbacks for 640-wide
    # rows weigh more than it: every tensor but the 168M-weight embedding gets its source type, and the
    # embedding's next type up does not fit what is left, so the plan stops short of the budget.
    assert out.stat().st_size > 0.8 * size
    iq2_m = next(c for c in report["comparisons"] if c["name"] == "IQ2_M")
    assert iq2_m["optimized_error"] < 0.5 * iq2_m["predicted_error"]
    for path in (preset, out):
        llm = llama_cpp.Llama(str(path), n_ctx=128, verbose=False)
        assert llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"].strip()
