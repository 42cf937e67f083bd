"""Plots of a state file: the trade-off the solver sees, a plan's bits by layer and class, per-tensor errors.

`bpwopt plot STATE` comes after the solve (and eval) stage and changes
nothing: it reads a state's measurements, plans and evaluations and draws
three figures. (a) The error/size trade-off: the solver's best plan at about
40 budgets across the reachable range, its predicted total error against
bits per weight, with llama.cpp's presets (the errors measured for their
types), the state's stored plans, and the KL divergence measured for a plan
where one was evaluated. (b) A plan's bits per weight by layer and tensor
class. (c) Every tensor's measured relative error against the bpw of each
candidate type.

The plot functions take plain data (the dataclasses below) and return a
matplotlib Figure, built without pyplot (no GUI, no global state) and
rendered by Agg (PNG) or the SVG backend; `read_plot_data` builds that data
from a state file, and `plot_state` writes the files.

The state holds no model path (a model is identified by its sha256, and a
path recorded at measure time goes stale when files move), and it needs
none: a stored plan names the type of every tensor of the file, its tensor
bytes and its bpw, which give the bytes of the tensors the solver did not
vary and the model's element count. Only the presets need the model itself
(llama.cpp's policy reads its tensor list and hyperparameters), so the
model is an optional argument, checked against the state's sha256.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType
from matplotlib import rc_context
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from bpwopt.errors import BpwoptError
from bpwopt.formats.output_paths import write_small_file
from bpwopt.formats.splits import model_sha256, open_model
from bpwopt.policy.llama import Category, QuantizeOptions, plan_types, preset_plans
from bpwopt.policy.presets import PRESETS, PRESETS_BY_NAME
from bpwopt.quant.types import row_bytes
from bpwopt.solve.objective import (
    DEFAULT_OBJECTIVE,
    OBJECTIVES,
    default_objective,
    get_objective,
    tensor_weights,
)
from bpwopt.solve.problem import tensor_options
from bpwopt.solve.solver import TensorOptions, solve
from bpwopt.state.store import Measurement, PlanRecord, StateFile, TensorRecord, read_identity

FORMATS = ("png", "svg")
CURVE_POINTS = 40
KLD_METRIC = "mean_kld"  # EvalResult's field names, as bpwopt.quality.evaluate reports them
KLD_STDERR_METRIC = "mean_kld_stderr"
_SOLVE_SECONDS = 2.0  # per traced budget: the MILP's gap is already tiny by then
_DPI = 110
_UNVARIED_RECIPE = "Q8_0"  # the optimizer's recipe without a TYPE: it pins nothing
_NO_LAYER = "—"

# One color per tensor class, shared by (b) and (c).
_CLASS_ORDER = tuple(c.value for c in Category)
_CLASS_COLORS = dict(
    zip(
        _CLASS_ORDER,
        (
            "#7f7f7f",  # token_embd
            "#1f77b4",  # attn_q
            "#17becf",  # attn_k
            "#d62728",  # attn_v
            "#ff9896",  # attn_qkv
            "#c5b0d5",  # attn_kv_b
            "#9467bd",  # attn_output
            "#2ca02c",  # ffn_up
            "#bcbd22",  # ffn_gate
            "#ff7f0e",  # ffn_down
            "#8c564b",  # output
            "#c7c7c7",  # other
        ),
        strict=True,
    )
)


@dataclass(frozen=True)
class MarkedPoint:
    """A plan or preset on the trade-off plot: its bpw, its predicted error and, if evaluated, its KLD."""

    label: str
    bits_per_weight: float
    error: float  # the plotted objective's value of its types
    kld: float = math.nan  # measured mean KL divergence against the source, nats per token
    kld_stderr: float = math.nan


@dataclass(frozen=True)
class TradeoffData:
    """Curve (a): the solver's best predicted error at each traced budget."""

    model_name: str
    objective: str
    error_label: str  # what the error axis measures, with its weighting
    bits_per_weight: np.ndarray  # float64 (n,), increasing: bpw of the solver's plan at each budget
    error: np.ndarray  # float64 (n,): its predicted total error (objective units)
    presets: tuple[MarkedPoint, ...] = ()
    plans: tuple[MarkedPoint, ...] = ()
    note: str = ""  # printed under the title, e.g. why the presets are missing


@dataclass(frozen=True)
class PlanBits:
    """Figure (b): a plan's bits per weight per tensor class (rows) and layer (columns)."""

    title: str
    classes: tuple[str, ...]  # row labels, Category values
    columns: tuple[str, ...]  # "0", "1", …, then "—" for tensors outside the blocks
    bits_per_weight: np.ndarray  # float64 (n_classes, n_columns), NaN where the layer has no such tensor
    types: tuple[tuple[str, ...], ...]  # type names, same shape, "" where absent
    bits: np.ndarray  # float64 (n_classes, n_columns): bits of the tensor data, 0 where absent
    elements: np.ndarray  # int64 (n_classes, n_columns): weights, 0 where absent


@dataclass(frozen=True)
class TensorCurves:
    """Figure (c): each tensor's measured (bpw, relative error) points, bpw increasing."""

    title: str
    error_label: str
    names: tuple[str, ...]
    categories: tuple[str, ...]
    bits_per_weight: tuple[np.ndarray, ...]  # float64 per tensor
    relative_error: tuple[np.ndarray, ...]  # float64 per tensor, Σw(x−x̂)² / Σwx²
    types: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class PlotData:
    """Everything `plot_state` draws; a figure whose data the state cannot give is None, with the reason."""

    tradeoff: TradeoffData | None
    plan_bits: PlanBits | None
    plan_id: int | None
    tensor_curves: TensorCurves
    skipped: tuple[str, ...]  # one line per figure not drawn, saying why


# --- the figures -------------------------------------------------------------------------------------------------


def plot_tradeoff(data: TradeoffData) -> Figure:
    """(a) Predicted total error (log) against bits per weight, presets and plans marked, KLD on a right axis."""
    fig = Figure(figsize=(10, 6.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(data.bits_per_weight, data.error, "-o", color="#1f77b4", ms=3, lw=1.6, label="bpwopt: best plan per budget")
    if data.presets:
        ax.plot([p.bits_per_weight for p in data.presets], [p.error for p in data.presets], "s", color="#ff7f0e",
                ms=6, mec="black", mew=0.5, label="llama.cpp preset (its types, same objective)")  # fmt: skip
    if data.plans:
        ax.plot([p.bits_per_weight for p in data.plans], [p.error for p in data.plans], "*", color="#d62728",
                ms=14, mec="black", mew=0.6, label="stored plan (predicted)")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (tensor data × 8 / weights, as llama.cpp counts it)")
    ax.set_ylabel(f"predicted error, log scale\n{data.error_label}")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", axis="y", alpha=0.12)
    handles, labels = ax.get_legend_handles_labels()
    right = None
    evaluated = [p for p in data.plans if math.isfinite(p.kld)]
    if evaluated:
        right = ax.twinx()
        stderr = [p.kld_stderr if math.isfinite(p.kld_stderr) else 0.0 for p in evaluated]
        right.errorbar([p.bits_per_weight for p in evaluated], [p.kld for p in evaluated], yerr=stderr, fmt="D",
                       color="#2ca02c", mec="black", mew=0.6, ms=7, capsize=3)  # fmt: skip
        right.set_yscale("log")
        right.set_ylabel("measured mean KL divergence vs source (nats/token), log scale", color="#1a6e1a")
        right.tick_params(axis="y", colors="#1a6e1a")
        _widen_log_limits(right, [p.kld for p in evaluated])
        handles.append(Line2D([], [], ls="", marker="D", color="#2ca02c", mec="black", ms=7))
        labels.append("measured KLD of a stored plan (right axis)")
    legend = ax.legend(handles, labels, loc="upper right", fontsize=9, framealpha=0.9)
    fig.suptitle(f"{data.model_name}: error/size trade-off the solver sees (objective: {data.objective})", fontsize=12)
    if data.note:
        ax.set_title(data.note, fontsize=8.5, color="#555555")
    # Labels go where they overlap nothing drawn so far: the legend, the markers, earlier labels.
    labels_to_place = [(ax, p.bits_per_weight, p.error, p.label, {"fontsize": 8, "color": "#8b0000",
                        "fontweight": "bold"}) for p in data.plans]  # fmt: skip
    labels_to_place += [(ax, p.bits_per_weight, p.error, p.label, {"fontsize": 7.5, "color": "#a04000"})
                        for p in data.presets]  # fmt: skip
    if right is not None:
        labels_to_place += [(right, p.bits_per_weight, p.kld, f"KLD {p.kld:.3g}", {"fontsize": 8,
                            "color": "#1a6e1a"}) for p in evaluated]  # fmt: skip
    markers = [(ax, p.bits_per_weight, p.error) for p in (*data.plans, *data.presets)]
    markers += [(right, p.bits_per_weight, p.kld) for p in evaluated]
    _place_labels(fig, labels_to_place, markers, [legend])
    return fig


def plot_plan_bits(data: PlanBits) -> Figure:
    """(b) Bits per weight of each layer, stacked by tensor class, over a class × layer heatmap of bpw and types."""
    n_classes, n_columns = data.bits_per_weight.shape
    fig = Figure(figsize=(max(8.0, 0.34 * n_columns + 2.5), 3.4 + 0.42 * n_classes), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.0, max(1.2, 0.22 * n_classes)])
    x = np.arange(n_columns)
    layer_elements = data.elements.sum(axis=0)
    base = np.zeros(n_columns)
    for row, name in enumerate(data.classes):
        share = np.divide(data.bits[row], layer_elements, out=np.zeros(n_columns), where=layer_elements > 0)
        top.bar(x, share, bottom=base, color=_CLASS_COLORS.get(name, "#c7c7c7"), width=0.8, label=name,
                edgecolor="white", linewidth=0.3)  # fmt: skip
        base += share
    top.set_ylabel("bits per weight\nof the layer")
    top.set_ylim(0, max(base.max() * 1.08, 1.0))
    top.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=min(len(data.classes), 6), fontsize=8,
               frameon=False)  # fmt: skip
    top.grid(True, axis="y", alpha=0.35)

    levels = np.unique(data.bits_per_weight[np.isfinite(data.bits_per_weight)])
    colors = _ramp(len(levels))
    boundaries = np.concatenate([[levels[0] - 0.5], (levels[1:] + levels[:-1]) / 2, [levels[-1] + 0.5]])
    norm = BoundaryNorm(boundaries, len(levels))
    cmap = ListedColormap(colors).with_extremes(bad="#f4f4f4")
    image = bottom.imshow(np.ma.masked_invalid(data.bits_per_weight), aspect="auto", cmap=cmap, norm=norm,
                          interpolation="nearest")  # fmt: skip
    for row in range(n_classes):
        for column in range(n_columns):
            name = data.types[row][column]
            if name:
                dark = _luminance(cmap(norm(data.bits_per_weight[row, column]))) < 0.5
                bottom.text(column, row, name, ha="center", va="center", fontsize=6.5 if n_columns > 16 else 8,
                            color="white" if dark else "black")  # fmt: skip
    bottom.set_yticks(np.arange(n_classes), data.classes)
    bottom.set_xticks(x, data.columns)
    bottom.set_xlabel(f"layer (block index; {_NO_LAYER} = outside the blocks: token embedding, output)")
    bottom.set_ylabel("tensor class")
    bar = fig.colorbar(image, ax=bottom, ticks=levels, pad=0.01, fraction=0.04)
    names_at = {level: sorted({t for t, b in zip(_flat(data.types), data.bits_per_weight.ravel(), strict=True)
                               if t and b == level}) for level in levels}  # fmt: skip
    bar.ax.set_yticks(levels, [f"{level:g}  {', '.join(names_at[level])}" for level in levels])
    bar.set_label("bits per weight (types at that bpw)")
    bar.ax.tick_params(labelsize=7.5)
    fig.suptitle(data.title, fontsize=12)
    return fig


def plot_tensor_errors(data: TensorCurves) -> Figure:
    """(c) Each tensor's relative error (log) against bpw of its measured candidate types, colored by class.

    A line joins a tensor's non-dominated candidates (no cheaper-or-equal type has less error: the only
    ones a solver ever picks); dominated candidates are hollow dots. The top axis names the types.
    """
    fig = Figure(figsize=(10, 6.4), layout="constrained")
    ax = fig.add_subplot()
    present, type_names, unshown = [], {}, 0
    for category, bpw, error, types in zip(
        data.categories, data.bits_per_weight, data.relative_error, data.types, strict=True
    ):
        color = _CLASS_COLORS.get(category, "#c7c7c7")
        shown = error > 0  # a candidate equal to the source type adds no error: nothing to draw on a log axis
        unshown += int((~shown).sum())
        best = _non_dominated(bpw, error) & shown
        ax.plot(bpw[best], error[best], "-", color=color, lw=0.7, alpha=0.5, marker="o", ms=2)
        dominated = ~best & shown
        ax.plot(bpw[dominated], error[dominated], "o", ms=3, mfc="none", mec=color, mew=0.6, alpha=0.5)
        for value, name in zip(bpw, types, strict=True):
            type_names.setdefault(round(float(value), 4), set()).add(name)
        if category not in present:
            present.append(category)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the candidate type (tensor data × 8 / weights)")
    ax.set_ylabel(f"relative squared error, log scale\n{data.error_label}")
    ax.grid(True, which="major", alpha=0.35)
    top = ax.secondary_xaxis("top")
    ticks = sorted(type_names)
    top.set_xticks(ticks, ["\n".join(sorted(type_names[t])) for t in ticks], fontsize=7)
    top.tick_params(axis="x", length=3, pad=1)
    ordered = [c for c in _CLASS_ORDER if c in present]
    handles = [Line2D([], [], color=_CLASS_COLORS.get(c, "#c7c7c7"), lw=2, marker="o", ms=3) for c in ordered]
    handles.append(Line2D([], [], ls="", marker="o", ms=4, mfc="none", mec="#555555"))
    ax.legend(handles, [*ordered, "dominated candidate"], title="tensor class", fontsize=8.5, title_fontsize=8.5,
              loc="upper right")  # fmt: skip
    if unshown:
        ax.text(0.01, 0.01, f"not drawn (no error: the tensor's own source type): {unshown} candidate(s)",
                transform=ax.transAxes, fontsize=8, color="#555555")  # fmt: skip
    fig.suptitle(data.title, fontsize=12)
    return fig


def save_figure(fig: Figure, stem: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write fig as stem.png, stem.svg, …; returns the paths (SVG text as glyph outlines: same in every viewer)."""
    written = []
    with rc_context({"svg.hashsalt": "bpwopt"}):
        for fmt in formats:
            path = stem.with_name(f"{stem.name}.{fmt}")
            metadata = {"Date": None} if fmt == "svg" else {"Software": None} if fmt == "png" else None
            rendered = io.BytesIO()
            fig.savefig(rendered, format=fmt, dpi=_DPI, metadata=metadata)
            written.append(write_small_file(path, rendered.getvalue(), what="plot"))  # atomic, or through a device
    return written


def parse_formats(text: str) -> tuple[str, ...]:
    """--format png,svg: a comma-separated subset of FORMATS."""
    formats = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        raise BpwoptError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    return formats


# --- from a state file to plot data ------------------------------------------------------------------------------


def read_plot_data(
    state_path: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    *,
    plan_id: int | None = None,
    objective: str | None = None,
    points: int = CURVE_POINTS,
    exact: bool = True,
) -> PlotData:
    """Read a state (and optionally its model, for the presets) into the data of the three figures.

    plan_id selects the plan of figure (b) and the one whose fixed tensors the curve keeps (default:
    the newest). objective defaults to the one that plan was solved with (else default_objective), so
    the curve is the one the solver saw; it re-solves with the state's stored per-group weights, as the
    optimizer does by default. Every stored plan is placed by the error of its types under that objective.
    exact=False traces the curve with the solver's Lagrangian plans alone (milliseconds a point, for a
    page; the MILP would only close a gap of a few parts per million).
    """
    state_path = Path(state_path)
    with StateFile.open(state_path, read_identity(state_path), create=False) as state:
        identity = state.identity
        tensors = state.tensors()
        measurements = state.measurements()
        plans = state.plans()
        evaluations = state.evaluations()
        group_weights = state.values("weights")
        calibration = state.values("sensitivities")
        weights = tensor_weights(tensors, group_weights, state.values("tuned"))
    if model_path is not None:
        _check_model(Path(model_path), identity.model_sha256, state_path)
    chosen = _chosen_plan(plans, plan_id, state_path)
    if objective is None:
        objective = chosen[1].objective if chosen is not None and chosen[1].objective in OBJECTIVES else None
    objective = get_objective(objective or default_objective(group_weights, calibration)).name
    weighted = identity.imatrix_sha256 is not None
    curves = tensor_curves(tensors, measurements, identity.model_name, weighted)
    chosen_id = chosen[0] if chosen is not None else None
    skipped = []
    plan_bits_data = None
    if chosen is None:
        skipped.append("plan bits: the state holds no plan yet (solve a target with --state-file first)")
    elif not any(name in tensors for name in chosen[1].types):
        skipped.append(f"plan bits: plan {chosen_id} names none of the state's measured tensors")
    else:
        plan = chosen[1]
        title = (
            f"{identity.model_name}: bits per weight of plan {chosen_id} "
            f"({plan.target}: {plan.bits_per_weight:.3f} bpw, {plan.file_bytes / 1e6:.1f} MB file)"
        )
        plan_bits_data = plan_bits(plan, tensors, title)
    options = state_options(tensors, measurements, objective, weights)
    source = _open_model(Path(model_path), identity.imatrix_sha256, tensors) if model_path is not None else None
    if not options:
        skipped.append("trade-off: the state holds no measurements")
        return PlotData(None, plan_bits_data, chosen_id, curves, tuple(skipped))
    if chosen is not None:
        varied, fixed_bytes, elements = _fixed_part_from_plan(options, chosen[1])
    elif source is not None:
        varied, fixed_bytes, elements = _fixed_part_from_model(options, source)
    else:
        skipped.append("trade-off: the state holds no plan; pass the model (--model) to size the unvaried tensors")
        return PlotData(None, None, None, curves, tuple(skipped))
    bpw, error = trace_tradeoff(varied, fixed_bytes, elements, points, exact)
    marked = _plan_points(plans, options, _kld_by_plan(evaluations))
    presets = _preset_points(source, varied, elements) if source is not None else ()
    note = "" if source is not None else "llama.cpp presets not shown: pass the model (--model MODEL.gguf)"
    error_label = _error_label(objective, weighted, any(w != 1.0 for w in weights.values()))
    tradeoff = TradeoffData(identity.model_name, objective, error_label, bpw, error, presets, marked, note)
    return PlotData(tradeoff, plan_bits_data, chosen_id, curves, tuple(skipped))


def plot_state(
    state_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_path: str | os.PathLike | None = None,
    *,
    plan_id: int | None = None,
    formats: Sequence[str] = FORMATS,
    objective: str | None = None,
) -> tuple[list[Path], tuple[str, ...]]:
    """Draw every figure the state allows into out_dir: tradeoff.*, plan-<id>-bits.*, tensor-errors.*.

    Returns (paths written, one line per figure skipped and why).
    """
    data = read_plot_data(state_path, model_path, plan_id=plan_id, objective=objective)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BpwoptError(f"cannot create {out}: {error.strerror or error}") from None
    written = []
    if data.tradeoff is not None:
        written += save_figure(plot_tradeoff(data.tradeoff), out / "tradeoff", formats)
    if data.plan_bits is not None:
        written += save_figure(plot_plan_bits(data.plan_bits), out / f"plan-{data.plan_id}-bits", formats)
    written += save_figure(plot_tensor_errors(data.tensor_curves), out / "tensor-errors", formats)
    return written, data.skipped


def state_options(
    tensors: Mapping[str, TensorRecord],
    measurements: Mapping[tuple[str, str], Measurement],
    objective: str = DEFAULT_OBJECTIVE,
    weights: Mapping[str, float] | None = None,
) -> dict[str, TensorOptions]:
    """Every measured tensor's options as the solver sees them: raw tensor bytes (bpw units) and objective errors.

    weights: tensor name -> multiplier of its errors (bpwopt.solve.objective.tensor_weights; absent: 1).
    """
    rows: dict[str, list[Measurement]] = {}
    for (name, _), m in measurements.items():
        rows.setdefault(name, []).append(m)
    options = {}
    for name, measured in rows.items():
        measured.sort(key=lambda m: (m.nbytes, m.qtype))
        options[name] = tensor_options(name, measured, tensors[name], objective, (weights or {}).get(name, 1.0))
    return options


def trace_tradeoff(
    options: Sequence[TensorOptions], fixed_bytes: int, elements: int, points: int = CURVE_POINTS, exact: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The solver's plan at `points` budgets evenly spread from the smallest to the least-error plan.

    fixed_bytes: tensor data of everything not in options; elements: weights of the whole model.
    Returns float64 (bits per weight, total error) of the distinct plans that no smaller plan beats, bpw increasing.
    """
    from bpwopt.jobs.optimize import useful_range  # the optimizer imports the whole write path; only this is needed

    low, high = useful_range(options)
    budgets = np.unique(np.linspace(low, high, max(2, points)).round().astype(np.int64))
    found = {}
    for budget in budgets:
        solution = solve(options, int(budget), time_limit=_SOLVE_SECONDS, exact=exact)
        found[solution.total_bytes] = min(found.get(solution.total_bytes, math.inf), solution.total_error)
    bpw = 8.0 * (fixed_bytes + np.array(sorted(found), dtype=np.float64)) / elements
    error = np.array([found[b] for b in sorted(found)])
    front = _non_dominated(bpw, error)
    return bpw[front], error[front]


def plan_bits(plan: PlanRecord, tensors: Mapping[str, TensorRecord], title: str) -> PlanBits:
    """Figure (b)'s data: bpw of each measured tensor at the plan's type, by class and layer."""
    chosen = [(tensors[name], qtype) for name, qtype in plan.types.items() if name in tensors]
    layers = sorted({t.layer for t, _ in chosen if t.layer is not None})
    columns = [str(layer) for layer in layers]
    if any(t.layer is None for t, _ in chosen):
        columns.append(_NO_LAYER)
    classes = [c for c in _CLASS_ORDER if any(t.category == c for t, _ in chosen)]
    shape = (len(classes), len(columns))
    bpw, bits, elements = np.full(shape, np.nan), np.zeros(shape), np.zeros(shape, dtype=np.int64)
    types = [[""] * len(columns) for _ in classes]
    for record, qtype in chosen:
        row = classes.index(record.category)
        column = columns.index(_NO_LAYER if record.layer is None else str(record.layer))
        n_per_row = record.shape[0]
        tensor_bits = 8 * record.elements // n_per_row * row_bytes(GGMLQuantizationType[qtype], n_per_row)
        bits[row, column] += tensor_bits
        elements[row, column] += record.elements
        bpw[row, column] = bits[row, column] / elements[row, column]
        types[row][column] = qtype if not types[row][column] or types[row][column] == qtype else "mixed"
    return PlanBits(title, tuple(classes), tuple(columns), bpw, tuple(map(tuple, types)), bits, elements)


def tensor_curves(
    tensors: Mapping[str, TensorRecord],
    measurements: Mapping[tuple[str, str], Measurement],
    model_name: str,
    weighted: bool,
) -> TensorCurves:
    """Figure (c)'s data: per tensor, (bpw, Σw(x−x̂)²/Σwx²) of each measured type, bpw increasing."""
    rows: dict[str, list[Measurement]] = {}
    for (name, _), m in measurements.items():
        rows.setdefault(name, []).append(m)
    names, categories, bpws, errors, types = [], [], [], [], []
    for name in sorted(rows, key=lambda n: (_CLASS_ORDER.index(tensors[n].category), n)):
        record = tensors[name]
        measured = sorted(rows[name], key=lambda m: (m.nbytes, m.qtype))
        energy = record.weight_energy
        names.append(name)
        categories.append(record.category)
        bpws.append(np.array([8.0 * m.nbytes / record.elements for m in measured]))
        errors.append(np.array([m.value("weighted_sse") / energy if energy > 0 else 0.0 for m in measured]))
        types.append(tuple(m.qtype for m in measured))
    title = f"{model_name}: error of every candidate type, per tensor ({len(names)} tensors)"
    label = "Σw(x−x̂)² / Σwx², w = imatrix" if weighted else "Σ(x−x̂)² / Σx² (no imatrix)"
    return TensorCurves(title, label, tuple(names), tuple(categories), tuple(bpws), tuple(errors), tuple(types))


# --- helpers -----------------------------------------------------------------------------------------------------


def _check_model(model_path: Path, state_sha256: str, state_path: Path) -> None:
    if not model_path.is_file():
        raise BpwoptError(f"{model_path}: no such file")
    sha256 = model_sha256(open_model(model_path))
    if sha256 != state_sha256:
        raise BpwoptError(
            f"{model_path} is not the model state file {state_path} was measured from "
            f"(sha256 {sha256[:12]}… ≠ {state_sha256[:12]}…)"
        )


def _open_model(model_path: Path, imatrix_sha256: str | None, tensors: Mapping[str, TensorRecord]):
    """The model as the policy reads it, with an imatrix 'present' when the state was measured with one."""
    from bpwopt.jobs.quantize import open_source  # imports the write path; only needed with a model

    # Some preset rules depend on whether an imatrix is given at all (llama.cpp bumps Q4_0/Q5_0's first
    # layers with one), not on its values: the measured tensors stand in for the imatrix's entries.
    imatrix_names = frozenset(tensors) if imatrix_sha256 is not None else None
    return open_source(model_path, None, QuantizeOptions(allow_requantize=True, imatrix_names=imatrix_names))


def _chosen_plan(
    plans: list[tuple[int, PlanRecord]], plan_id: int | None, state_path: Path
) -> tuple[int, PlanRecord] | None:
    if plan_id is None:
        return plans[-1] if plans else None
    for pair in plans:
        if pair[0] == plan_id:
            return pair
    ids = ", ".join(str(i) for i, _ in plans) or "none"
    raise BpwoptError(f"no plan {plan_id} in state file {state_path} (plans: {ids})")


def _fixed_part_from_plan(
    options: Mapping[str, TensorOptions], plan: PlanRecord
) -> tuple[list[TensorOptions], int, int]:
    """(varied options, bytes of the rest, weights of the model) as the run that made `plan` saw them.

    A measured tensor whose planned type was not measured was pinned in that run (--ignore, --tensor-type):
    it stays with the fixed tensors.
    """
    varied = [o for name, o in options.items() if plan.types.get(name) in o.labels]
    varied_bytes = sum(int(o.nbytes[o.labels.index(plan.types[o.name])]) for o in varied)
    elements = round(8 * plan.total_bytes / plan.bits_per_weight)
    return varied, plan.total_bytes - varied_bytes, elements


def _fixed_part_from_model(options: Mapping[str, TensorOptions], source) -> tuple[list[TensorOptions], int, int]:
    """The same from the model and llama.cpp's policy, for a state without a plan: default options assumed."""
    from bpwopt.jobs.quantize import tensor_output_bytes

    base = plan_types(source.specs, source.model, PRESETS_BY_NAME[_UNVARIED_RECIPE], source.options,
                      check_writable=False)  # fmt: skip
    by_name = source.tensors_by_name
    varied_names = {t.source_name for t in base.tensors if t.quantizable and not t.pinned and t.source_name in options}
    fixed = sum(
        tensor_output_bytes(by_name[t.source_name], t.target_type)
        for t in base.tensors
        if t.source_name not in varied_names
    )
    elements = sum(int(by_name[t.source_name].n_elements) for t in base.tensors)
    return [options[name] for name in options if name in varied_names], fixed, elements


def _preset_points(source, varied: Sequence[TensorOptions], elements: int) -> tuple[MarkedPoint, ...]:
    """llama.cpp's presets whose types were all measured, placed by the error of those types.

    Presets with the same types everywhere (on narrow models many K-quant presets fall back to the same
    legacy types) share one point and one label.
    """
    from bpwopt.jobs.quantize import plan_data_bytes

    points: dict[tuple[float, float], list[str]] = {}
    # One preset per ftype, by its last name: the aliases (Q4_K) come before the names people use (Q4_K_M).
    by_ftype = {p.ftype: p for p in PRESETS if not p.only_copy}
    for preset, plan in preset_plans(source.specs, source.model, by_ftype.values(), source.options):
        types = plan.types()
        if any(types.get(o.name) is None or types[o.name].name not in o.labels for o in varied):
            continue  # a type the state has no measurement of
        error = float(sum(o.error[o.labels.index(types[o.name].name)] for o in varied))
        _, data_bytes = plan_data_bytes(source, types)
        points.setdefault((8.0 * data_bytes / elements, error), []).append(preset.name)
    return tuple(MarkedPoint(" = ".join(names), bpw, error) for (bpw, error), names in sorted(points.items()))


def _kld_by_plan(evaluations: list[dict]) -> dict[int, tuple[float, float]]:
    """plan id -> (mean KLD, its standard error) of the newest evaluation of that plan holding a KLD."""
    kld = {}
    for evaluation in evaluations:
        metrics = evaluation["metrics"]
        if evaluation["plan_id"] is not None and KLD_METRIC in metrics:
            kld[evaluation["plan_id"]] = (metrics[KLD_METRIC], metrics.get(KLD_STDERR_METRIC, math.nan))
    return kld


def _plan_points(
    plans: list[tuple[int, PlanRecord]], options: Mapping[str, TensorOptions], kld: Mapping[int, tuple[float, float]]
) -> tuple[MarkedPoint, ...]:
    """Stored plans under the plotted objective; plans with identical types share a point ("#2 = #4")."""
    groups: dict[tuple, list[int]] = {}
    for plan_id, plan in plans:
        groups.setdefault(tuple(sorted(plan.types.items())), []).append(plan_id)
    by_id = dict(plans)
    points = []
    for ids in groups.values():
        plan = by_id[ids[-1]]
        error = sum(
            float(o.error[o.labels.index(plan.types[name])])
            for name, o in options.items()
            if plan.types.get(name) in o.labels
        )
        evaluated = [kld[i] for i in ids if i in kld]
        value, stderr = evaluated[-1] if evaluated else (math.nan, math.nan)
        label = " = ".join(f"#{i}" for i in ids) + f" ({plan.target})"
        points.append(MarkedPoint(label, plan.bits_per_weight, error, value, stderr))
    return tuple(sorted(points, key=lambda p: p.bits_per_weight))


def _flat(rows: Sequence[Sequence[str]]) -> list[str]:
    return [item for row in rows for item in row]


def _non_dominated(bpw: np.ndarray, error: np.ndarray) -> np.ndarray:
    """bool mask of the points that no other point beats or matches on both bpw and error (first of ties kept)."""
    order = np.lexsort((error, bpw))
    keep = np.zeros(bpw.size, dtype=bool)
    best = math.inf
    for index in order:
        if error[index] < best:
            keep[index] = True
            best = error[index]
    return keep


def _error_label(objective: str, weighted: bool, group_weights: bool) -> str:
    w = "w = imatrix" if weighted else "w = 1 (no imatrix)"
    term = get_objective(objective).term
    scaled = " × stored group weight and tuned factor" if group_weights else ""
    return f"sum over tensors of {term}{scaled}, {w}"


# Offsets (points) tried in turn for a label beside its marker, nearest first, with the text's alignment.
_LABEL_OFFSETS = tuple(
    (dx, dy, "left" if dx > 0 else "right") for dy in (3, -11, 12, -20, 21, -29, 30, -38) for dx in (6, -6)
)


def _place_labels(fig: Figure, labels: Sequence[tuple], markers: Sequence[tuple], obstacles: Sequence) -> None:
    """Annotate each (axes, x, y, text, style) at the first offset whose box overlaps no earlier box.

    The layout is drawn once first so that boxes are in final display coordinates; the labels are kept
    out of the layout so that placing them does not move the axes they were placed on.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import Bbox

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    taken = [artist.get_window_extent(renderer) for artist in obstacles]
    for axes, x, y in markers:
        px, py = axes.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - 5, py - 5, px + 5, py + 5))
    inside = fig.bbox
    for axes, x, y, text, style in labels:
        chosen = None
        for dx, dy, align in _LABEL_OFFSETS:
            annotation = axes.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=align, **style)
            annotation.set_in_layout(False)
            box = annotation.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(other) for other in taken):
                chosen = box
                break
            annotation.remove()
        if chosen is None:  # nowhere free: the first place, overlapping
            annotation = axes.annotate(text, (x, y), xytext=_LABEL_OFFSETS[0][:2], textcoords="offset points",
                                       ha=_LABEL_OFFSETS[0][2], **style)  # fmt: skip
            annotation.set_in_layout(False)
            chosen = annotation.get_window_extent(renderer)
        taken.append(chosen)


def _widen_log_limits(ax, values: Sequence[float]) -> None:
    """Half a decade of room around the values, so a single point is not pinned to an edge."""
    positive = [v for v in values if v > 0]
    if positive:
        ax.set_ylim(min(positive) / 3, max(positive) * 3)


def _ramp(n: int) -> list:
    """n colors from pale to dark: few bits pale, many bits dark."""
    from matplotlib import colormaps

    cmap = colormaps["viridis_r"]
    return [cmap(0.08 + 0.84 * i / max(1, n - 1)) for i in range(n)]


def _luminance(rgba) -> float:
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b
