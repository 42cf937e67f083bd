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


def test_after_calibrate_the_output_is_the_plan_only_if_it_beats_the_preset_significantly(model, tmp_path, capsys):
    preset = tmp_path / "q4_k_m.gguf"
    assert main(["--quiet", str(model), str(preset), "Q4_K_M"]) == 0
    state = tmp_path / "s.bpw_state"
    size = str(preset.stat().st_size)
    run_json(capsys, "--quiet", "--json", "--dry-run", *SAMPLE, "--target-size", size, "--state-file", state, model)
    assert main(["calibrate", str(model), "--state-file", str(state), "--chunks", "1", "--ctx", "64", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "out.gguf"
    summary = run_json(capsys, "--quiet", "--json", *SAMPLE, "--target-size", size, "--state-file", state, model, out)

    labels = [c["label"] for c in summary["check"]["candidates"]]
    assert len(labels) == 2 and labels[1] in ("Q4_K", "Q4_K_M")  # the largest preset at or below the target (alias)
    check = summary["check"]
    plan, preset_result = check["candidates"]
    assert check["difference"] == pytest.approx(preset_result["mean_kld"] - plan["mean_kld"], rel=1e-6)
    assert check["difference_stderr"] > 0
    best = plan if check["difference"] > SIGNIFICANCE * check["difference_stderr"] else preset_result
    assert check["kept"] == best["label"]
    kept = evaluate(model, out, calibration_text(), ctx=DEFAULT_CTX, chunks=DEFAULT_CHUNKS, progress=False)
    assert kept.mean_kld == pytest.approx(best["mean_kld"], rel=1e-9)  # the file at OUT is the one that won
    assert out.stat().st_size == best["file_bytes"] <= int(size)
    if best["label"] != labels[0]:
        assert out.read_bytes() == preset.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # temporaries removed


def test_without_calibration_auto_does_not_check_and_on_does(model, tmp_path, capsys):
    state = tmp_path / "s.bpw_state"
    common = ["--quiet", "--json", *SAMPLE, "--target-bpw", "5.5", "--state-file", state, model]
    assert "check" not in run_json(capsys, *common, tmp_path / "auto.gguf")
    forced = run_json(capsys, *common, tmp_path / "on.gguf", "--check", "on")
    assert forced["check"]["kept"] in [c["label"] for c in forced["check"]["candidates"]]
    assert (tmp_path / "on.gguf").is_file()
