"""The KLD check: the output is bpwopt's plan only if it beats the fitting preset's KLD significantly."""

from __future__ import annotations

import json

import pytest
from gguf import GGMLQuantizationType as Q

from bpwopt.cli.main import main
from bpwopt.quality.evaluate import evaluate
from bpwopt.quality.guarantee import DEFAULT_CHUNKS, DEFAULT_CTX, SIGNIFICANCE
from bpwopt.quality.texts import calibration_text
from tests.synthetic_models import write_tiny_llama

pytestmark = pytest.mark.slow  # measures, calibrates and evaluates a tiny model through llama.cpp

SAMPLE = ["--sample-rows", "64", "--candidates", "Q4_0,Q4_K,Q5_K,Q6_K,Q8_0"]


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("BPWOPT_CACHE", str(tmp_path / "cache"))
    return write_tiny_llama(tmp_path / "f16.gguf", Q.F16)


def run_json(capsys, *argv) -> dict:
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("rounding", ["ggml", "best"])
def test_after_calibrate_the_output_is_the_candidate_that_beats_the_preset_significantly(
    model, tmp_path, capsys, rounding
):
    preset = tmp_path / "q4_k_m.gguf"
    assert main(["--quiet", str(model), str(preset), "Q4_K_M"]) == 0
    state = tmp_path / "s.bpw_state"
    size = str(preset.stat().st_size)
    common = ["--quiet", "--json", *SAMPLE, "--rounding", rounding, "--target-size", size, "--state-file", state]
    run_json(capsys, *common, "--dry-run", model)
    assert main(["calibrate", str(model), "--state-file", str(state), "--chunks", "1", "--ctx", "64", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "out.gguf"
    check = run_json(capsys, *common, model, out)["check"]

    labels = [c["label"] for c in check["candidates"]]
    assert labels[-1] in ("Q4_K", "Q4_K_M")  # llama.cpp's own: the largest preset at or below the target (alias)
    # With best rounding, the preset's types in that rounding compete too; the plan always comes first.
    assert labels[1:-1] == ([] if rounding == "ggml" else [f"{labels[-1]}, best rounding"])
    *others, reference = check["candidates"]
    for candidate in others:
        assert candidate["lead"] == pytest.approx(reference["mean_kld"] - candidate["mean_kld"], rel=1e-6)
        assert candidate["lead_stderr"] > 0
    assert (check["difference"], check["difference_stderr"]) == (others[0]["lead"], others[0]["lead_stderr"])
    leading = [c for c in others if c["lead"] > SIGNIFICANCE * c["lead_stderr"]]
    best = min(leading, key=lambda c: c["mean_kld"], default=reference)
    assert check["kept"] == best["label"]
    kept = evaluate(model, out, calibration_text(), ctx=DEFAULT_CTX, chunks=DEFAULT_CHUNKS, progress=False)
    assert kept.mean_kld == pytest.approx(best["mean_kld"], rel=1e-9)  # the file at OUT is the one that won
    assert out.stat().st_size == best["file_bytes"] <= int(size)
    if best is reference:
        assert out.read_bytes() == preset.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # temporaries removed


def test_without_calibration_auto_does_not_check_and_on_does(model, tmp_path, capsys):
    state = tmp_path / "s.bpw_state"
    common = ["--quiet", "--json", *SAMPLE, "--target-bpw", "5.5", "--state-file", state, model]
    assert "check" not in run_json(capsys, *common, tmp_path / "auto.gguf")
    forced = run_json(capsys, *common, tmp_path / "on.gguf", "--check", "on")
    assert forced["check"]["kept"] in [c["label"] for c in forced["check"]["candidates"]]
    assert (tmp_path / "on.gguf").is_file()
