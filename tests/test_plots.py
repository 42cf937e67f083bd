"""`bpwopt plot`: figures from a small state built here, and from a tiny model measured by the real pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from bpwopt.cli.main import main
from bpwopt.errors import BpwoptError
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.measure.measure import Sampling
from bpwopt.measure.records import Estimate
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.quality.plots import (
    parse_formats,
    plot_plan_bits,
    plot_state,
    plot_tensor_errors,
    plot_tradeoff,
    read_plot_data,
)
from bpwopt.solve.targets import Target
from bpwopt.state.store import Measurement, PlanRecord, StateFile, StateIdentity, TensorRecord
from tests.conftest import save_gguf

IDENTITY = StateIdentity(
    model_sha256="ab" * 32,
    model_name="tiny",
    imatrix_sha256=None,
    candidates=("Q4_0", "Q5_0", "Q8_0"),
    sampling="precise",
)
BPW = {"Q4_0": 4.5, "Q5_0": 5.5, "Q8_0": 8.5}
RELATIVE_ERROR = {"Q4_0": 1e-2, "Q5_0": 3e-3, "Q8_0": 1e-4}
TENSORS = {  # name -> (category, layer, elements)
    "token_embd.weight": ("token_embd", None, 256 * 64),
    "blk.0.attn_q.weight": ("attn_q", 0, 256 * 256),
    "blk.0.ffn_down.weight": ("ffn_down", 0, 256 * 512),
    "blk.1.attn_q.weight": ("attn_q", 1, 256 * 256),
    "blk.1.ffn_down.weight": ("ffn_down", 1, 256 * 512),
}
NORM_ELEMENTS = 256  # blk.0.attn_norm.weight: F32, never varied, in every plan but not in the state
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def both_statistics(error: float) -> dict[str, Estimate]:
    """The same error imatrix-weighted and plain, both exact."""
    return {"weighted_sse": Estimate(error, 0.0), "sse": Estimate(error, 0.0)}


def plan_of(qtype: str, target: str) -> PlanRecord:
    """Every measured tensor at qtype, plus the F32 norm the solver never varies."""
    elements = sum(e for _, _, e in TENSORS.values()) + NORM_ELEMENTS
    data_bytes = sum(e * BPW[qtype] / 8 for _, _, e in TENSORS.values()) + 4 * NORM_ELEMENTS
    types = {name: qtype for name in TENSORS} | {"blk.0.attn_norm.weight": "F32"}
    return PlanRecord(
        target, "relative", types, 1.0, int(data_bytes), int(data_bytes) + 4096, 8 * data_bytes / elements, 0
    )


@pytest.fixture
def state_path(tmp_path) -> Path:
    """Five tensors measured at Q4_0, Q5_0, Q8_0; plans #1 and #3 all Q4_0, #2 all Q8_0, #2 evaluated."""
    path = tmp_path / "tiny.bpw_state"
    with StateFile.open(path, IDENTITY) as state:
        for name, (category, layer, elements) in TENSORS.items():
            shape = (256, elements // 256)
            state.add_tensors([TensorRecord(name, shape, elements, "F16", category, layer, 2.0, 2.0)])
            for qtype, bpw in BPW.items():
                error = 2.0 * RELATIVE_ERROR[qtype] * (3 if category == "token_embd" else 1)
                state.add_measurement(
                    Measurement(name, qtype, int(elements * bpw / 8), both_statistics(error), 64, 64, 0.01)
                )
        first = state.add_plan(plan_of("Q4_0", "bpw<=4.6"))
        second = state.add_plan(plan_of("Q8_0", "bpw<=9"))
        state.add_plan(plan_of("Q4_0", "bpw<=4.6"))
        state.add_evaluation(second, "q8.gguf", {"mean_kld": 0.002, "mean_kld_stderr": 0.0003}, "ef" * 32)
        assert (first, second) == (1, 2)
    return path


def legend_texts(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_plot_state_writes_png_and_svg_of_every_figure(state_path, tmp_path):
    written, skipped = plot_state(state_path, tmp_path / "plots")

    assert sorted(path.name for path in written) == [
        "plan-3-bits.png", "plan-3-bits.svg", "tensor-errors.png", "tensor-errors.svg", "tradeoff.png", "tradeoff.svg",
    ]  # fmt: skip
    assert skipped == ()
    for path in written:
        head = path.read_bytes()[:200]
        assert head.startswith(PNG_MAGIC) if path.suffix == ".png" else b"<svg" in head
        assert path.stat().st_size > 10_000


def test_tradeoff_spans_the_reachable_range_and_marks_plans_and_kld(state_path):
    data = read_plot_data(state_path).tradeoff
    all_q4, all_q8 = plan_of("Q4_0", ""), plan_of("Q8_0", "")

    assert data.bits_per_weight[0] == pytest.approx(all_q4.bits_per_weight)
    assert data.bits_per_weight[-1] == pytest.approx(all_q8.bits_per_weight)
    assert data.objective == "relative"  # the plans' own objective
    assert data.error[0] == pytest.approx(1e-2 * 4 + 3e-2)  # relative errors summed over the five tensors
    assert read_plot_data(state_path, objective="wsse").tradeoff.error[0] == pytest.approx(2 * (1e-2 * 4 + 3e-2))
    assert np.all(np.diff(data.bits_per_weight) > 0) and np.all(np.diff(data.error) < 0)
    assert [(p.label, p.kld) for p in data.plans if not math.isnan(p.kld)] == [("#2 (bpw<=9)", 0.002)]
    assert [p.label for p in data.plans] == ["#1 = #3 (bpw<=4.6)", "#2 (bpw<=9)"]  # same types: one star
    assert data.presets == () and "--model" in data.note


def test_tradeoff_figure_has_log_error_axis_legend_and_kld_axis(state_path):
    fig = plot_tradeoff(read_plot_data(state_path).tradeoff)
    ax, right = fig.axes

    assert ax.get_yscale() == "log" and right.get_yscale() == "log"
    assert ax.get_xlabel().startswith("bits per weight")
    assert "predicted error" in ax.get_ylabel() and "Σw(x−x̂)²/Σwx²" in ax.get_ylabel()
    assert "KL divergence" in right.get_ylabel() and "nats/token" in right.get_ylabel()
    assert legend_texts(ax) == [
        "bpwopt: best plan per budget",
        "stored plan (predicted)",
        "measured KLD of a stored plan (right axis)",
    ]
    assert {"#1 = #3 (bpw<=4.6)", "#2 (bpw<=9)", "KLD 0.002"} <= {t.get_text() for t in ax.texts + right.texts}


def test_plan_bits_is_a_class_by_layer_grid_of_the_chosen_plan(state_path):
    data = read_plot_data(state_path, plan_id=2).plan_bits
    fig = plot_plan_bits(data)
    bars, grid = fig.axes[:2]

    assert data.classes == ("token_embd", "attn_q", "ffn_down")
    assert data.columns == ("0", "1", "—")
    assert [label.get_text() for label in grid.get_yticklabels()] == list(data.classes)
    assert [label.get_text() for label in grid.get_xticklabels()] == ["0", "1", "—"]
    assert [t.get_text() for t in grid.texts] == ["Q8_0"] * 5
    assert "layer" in grid.get_xlabel() and "bits per weight" in bars.get_ylabel()
    assert legend_texts(bars) == ["token_embd", "attn_q", "ffn_down"]
    token_embd_bars = [patch.get_height() for patch in bars.patches[:3]]  # the first class, in columns 0, 1, —
    assert token_embd_bars == pytest.approx([0, 0, 8.5])
    assert np.nansum(data.bits_per_weight) == pytest.approx(5 * 8.5)


def test_tensor_errors_draw_one_line_per_tensor_by_class(state_path):
    data = read_plot_data(state_path).tensor_curves
    fig = plot_tensor_errors(data)
    (ax, *_) = fig.axes

    assert len(data.names) == 5
    assert np.allclose(data.bits_per_weight[0], [4.5, 5.5, 8.5])
    assert ax.get_yscale() == "log" and "relative squared error" in ax.get_ylabel()
    assert ax.get_xlabel().startswith("bits per weight")
    assert legend_texts(ax) == ["token_embd", "attn_q", "ffn_down", "dominated candidate"]


def test_unknown_plan_and_format_are_refused(state_path, tmp_path):
    with pytest.raises(BpwoptError, match=r"no plan 9 .*plans: 1, 2, 3"):
        read_plot_data(state_path, plan_id=9)
    with pytest.raises(BpwoptError, match="png, svg"):
        parse_formats("png,jpg")
    assert parse_formats("SVG, png") == ("svg", "png")


def test_state_without_plans_draws_only_the_tensor_errors(tmp_path):
    path = tmp_path / "empty.bpw_state"
    with StateFile.open(path, IDENTITY) as state:
        state.add_tensors([TensorRecord("blk.0.attn_q.weight", (256, 4), 1024, "F16", "attn_q", 0, 1.0, 1.0)])
        state.add_measurement(Measurement("blk.0.attn_q.weight", "Q4_0", 576, both_statistics(0.01), 4, 4, 0.0))

    written, skipped = plot_state(path, tmp_path / "plots", formats=("png",))

    assert [p.name for p in written] == ["tensor-errors.png"]
    assert len(skipped) == 2 and "no plan" in skipped[0]


# --- a real model: the presets need its tensor list -----------------------------------------------------------------


def tiny_model(path: Path, seed: int = 0) -> Path:
    """Two llama blocks of 256-wide F32 matrices: every candidate type fits."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", rng.standard_normal((64, 256)).astype(np.float32))
    for layer in range(2):
        for name, rows in (("attn_q", 256), ("attn_k", 256), ("attn_v", 256), ("attn_output", 256), ("ffn_up", 512)):
            writer.add_tensor(f"blk.{layer}.{name}.weight", rng.standard_normal((rows, 256)).astype(np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_down.weight", rng.standard_normal((256, 512)).astype(np.float32))
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(256, dtype=np.float32))
    save_gguf(writer)
    return path


@pytest.fixture(scope="module")
def measured_model(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tiny-model")
    model, state = tiny_model(folder / "tiny.gguf"), folder / "tiny.bpw_state"
    job = OptimizeJob(
        input_path=model, output_path=None, target=Target(bits_per_weight=5.0), options=QuantizeOptions(),
        sampling=Sampling(precise=True), state_path=state, dry_run=True, progress=False,
    )  # fmt: skip
    optimize_file(job)
    return model, state


def test_with_the_model_presets_are_placed_by_their_measured_types(measured_model):
    model, state = measured_model
    data = read_plot_data(state, model).tradeoff
    names = " = ".join(p.label for p in data.presets).split(" = ")

    assert {"Q4_0", "Q5_0", "Q8_0", "Q4_K_M", "Q6_K"} <= set(names)
    assert data.note == ""
    q8 = next(p for p in data.presets if "Q8_0" in p.label.split(" = "))
    assert q8.bits_per_weight == pytest.approx(8.5, abs=0.2)  # the F32 norms add a little
    inside = [p for p in data.presets if data.bits_per_weight[0] <= p.bits_per_weight <= data.bits_per_weight[-1]]
    # The solver at any budget above a preset's size does at least as well as the preset's own types.
    assert inside and all(p.error >= data.error[data.bits_per_weight >= p.bits_per_weight].min() for p in inside)
    fig = plot_tradeoff(data)
    assert "llama.cpp preset (its types, same objective)" in legend_texts(fig.axes[0])


def test_another_model_is_refused(measured_model, tmp_path):
    _, state = measured_model
    with pytest.raises(BpwoptError, match="is not the model"):
        read_plot_data(state, tiny_model(tmp_path / "other.gguf", seed=1))


def test_cli_plot_prints_the_written_paths(measured_model, tmp_path, capsys):
    model, state = measured_model
    assert main(["plot", str(state), "--model", str(model), "--out", str(tmp_path), "--format", "png"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["plan-1-bits.png", "tensor-errors.png", "tradeoff.png"]
    assert all(Path(p).read_bytes().startswith(PNG_MAGIC) for p in printed)

    assert main(["plot", str(state), "--plan", "7", "--out", str(tmp_path)]) == 1
    assert "no plan 7" in capsys.readouterr().err
