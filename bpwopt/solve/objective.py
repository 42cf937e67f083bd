"""What the solver minimizes: how errors of different tensors are made comparable.

A measurement gives, per (tensor, type), Σ_j w_j (W_ij − Ŵ_ij)² with w the
imatrix's column weights (mean squared input activation of column j). For a
linear layer y = W x that sum is the expected squared error the quantization
adds to y per token, E‖(W − Ŵ) x‖², when activations are uncorrelated across
columns. Three ways to add those up across tensors:

* `wsse`: the absolute sums. Every tensor's error is in units of its own
  output; tensors whose outputs are large (late layers of models whose
  residual stream grows, like Gemma 3) dominate, and the embedding, which
  has no imatrix entry, is weighed by 1.
* `relative`: each sum divided by the tensor's own signal Σ_j w_j W_ij², i.e.
  the noise-to-signal ratio its output gets. Scale-free, so the attention
  projections, FFN matrices and the embedding are on one footing; this is the
  quantity the noise-injection sensitivities (`bpwopt calibrate`) are
  calibrated against, so a per-group weight turns it into predicted KLD.
* `per-weight`: the tensor's number of weights times the mean of its
  imatrix-weighted and its plain relative error, i.e. each weight's error
  relative to its tensor's mean signal per weight. Scale-free like
  `relative` (activations that differ by orders of magnitude between layers
  do not skew it), but a tensor counts by its size, as in `wsse`. The plain
  half is a hedge: where one input channel holds most of a tensor's imatrix
  (SmolLM2's blk.11.ffn_down: 90 % in one of 1536), the weighted error of
  Q2_K is 2e-4 of the signal and the plain one 8e-2; weighted alone, such a
  tensor looks free and is cut to Q2_K.

Without an imatrix w = 1 and all three are plain squared error, scaled.
Per-group weights (sensitivities) and tuned factors multiply a tensor's terms.

Without an explicit `--objective`, a state holding calibrated group weights
is solved with `relative` (the sensitivities are KLD per unit of relative
error, so only that product predicts KLD), any other with `per-weight`
(`default_objective`). The evidence (benchmarks/quality.py, off-grid F16
bases with their imatrix, KLD against the base at the six preset sizes
Q3_K_S … Q5_K_M): `per-weight` gives 0.33×–0.69× the preset's KLD up to
Q4_K_M size and 1.07× at Q5_K_M on SmolLM2-135M (weighted alone: 0.35×–0.84×
and 1.46×; `wsse` 0.34×–1.31× and 1.43×); on Gemma-3-270M `wsse` is 1.4×–10×
worse than the presets (its absolute units differ by orders of magnitude between Gemma's tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bpwopt.errors import BpwoptError
from bpwopt.measure.records import Measurement, TensorRecord

# The objective's value of each option from the stored statistics, keyed by name, and the tensor's record.
ErrorFunction = Callable[[Mapping[str, np.ndarray], TensorRecord], np.ndarray]


@dataclass(frozen=True)
class Objective:
    """One way of making errors comparable across tensors: its formula, its plot label, what it reads."""

    name: str
    errors: ErrorFunction
    term: str  # the per-tensor term as a formula, for plot labels
    statistics: tuple[str, ...]  # the measurement statistics (bpwopt.measure.records.STATISTICS) it needs


def _relative(errors: np.ndarray, energy: float) -> np.ndarray:
    return errors / energy if energy > 0 else np.zeros_like(errors)


def _per_weight(stats: Mapping[str, np.ndarray], record: TensorRecord) -> np.ndarray:
    """Half imatrix-weighted, half plain, so that a few huge channels cannot make a tensor look free."""
    both = _relative(stats["weighted_sse"], record.weight_energy) + _relative(stats["sse"], record.plain_energy)
    return 0.5 * record.elements * both


REGISTRY = {
    objective.name: objective
    for objective in (
        Objective("wsse", lambda stats, record: stats["weighted_sse"], "Σw(x−x̂)²", ("weighted_sse",)),
        Objective(
            "relative",
            lambda stats, record: _relative(stats["weighted_sse"], record.weight_energy),
            "Σw(x−x̂)²/Σwx²",
            ("weighted_sse",),
        ),
        Objective("per-weight", _per_weight, "n·½(Σw(x−x̂)²/Σwx² + Σ(x−x̂)²/Σx²)", ("weighted_sse", "sse")),
    )
}
OBJECTIVES = tuple(REGISTRY)
DEFAULT_OBJECTIVE = "per-weight"


def get_objective(name: str) -> Objective:
    """The registered objective of this name, or ValueError naming the valid ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return REGISTRY[name]


def option_errors(
    objective: str, measurements: Sequence[Measurement], record: TensorRecord, weight: float = 1.0
) -> np.ndarray:
    """The objective's value (float64, ≥ 0) of each measured option of one tensor, times its group weight."""
    chosen = get_objective(objective)
    lacking = next((s for m in measurements for s in chosen.statistics if s not in m.statistics), None)
    if lacking is not None:
        raise BpwoptError(f"tensor {record.name}: the state has no {lacking} for it; measure it again")
    stats = {s: np.array([m.value(s) for m in measurements], dtype=np.float64) for s in chosen.statistics}
    errors = weight * chosen.errors(stats, record)
    unusable = ~(np.isfinite(errors) & (errors >= 0))  # NaN stored in the state, or a bad group weight
    if unusable.any():
        raise BpwoptError(
            f"tensor {record.name}: its stored error as {measurements[int(np.argmax(unusable))].qtype} times its "
            f"group weight {weight:g} is {errors[unusable][0]:g}; the state file is damaged"
        )
    return errors


GROUPINGS = ("class-third", "class", "class-layer", "tensor")
DEFAULT_GROUPING = "class-third"


def layer_thirds(n_layer: int) -> list[tuple[int, int]]:
    """The (first, last) layer of each third of n_layer blocks: layer l is in third l*3 // n_layer."""
    thirds = [[layer for layer in range(n_layer) if layer * 3 // n_layer == third] for third in range(3)]
    return [(members[0], members[-1]) for members in thirds if members]


def group_key(record: TensorRecord, n_layer: int, grouping: str = DEFAULT_GROUPING) -> str:
    """The weight key of the group a tensor belongs to under a grouping (GROUPINGS).

    class-third: "attn_v@0-9" (class and the inclusive layer range of its third of
    the blocks; the range, not the third's number, so that the key can be looked
    up without knowing n_layer and cannot be mistaken for a single layer's key);
    class: "attn_v"; class-layer: "attn_v@3"; tensor: the tensor's name.
    Tensors outside the blocks (token_embd, output) are their own group: their name.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; valid: {', '.join(GROUPINGS)}")
    if record.layer is None or grouping == "tensor":
        return record.name
    if grouping == "class":
        return record.category
    if grouping == "class-layer":
        return f"{record.category}@{record.layer}"
    first, last = next((lo, hi) for lo, hi in layer_thirds(n_layer) if lo <= record.layer <= hi)
    return f"{record.category}@{first}-{last}"


def _layer_range(key: str) -> tuple[str, int, int] | None:
    """("attn_v", 0, 9) for "attn_v@0-9", else None."""
    category, _, span = key.partition("@")
    first, dash, last = span.partition("-")
    if not dash or not first.isdigit() or not last.isdigit():
        return None
    return category, int(first), int(last)


def group_weight(record: TensorRecord, weights: Mapping[str, float]) -> float:
    """A tensor's multiplier: the most specific key found, else 1.

    Keys, most specific first: the tensor's name, `category@layer`,
    `category@first-last` (a layer range holding the tensor's layer, as
    `group_key` writes for class-third), `category`.
    """
    for key in (record.name, f"{record.category}@{record.layer}"):
        if key in weights:
            return float(weights[key])
    if record.layer is not None:
        for key, value in weights.items():
            span = _layer_range(key)
            if span is not None and span[0] == record.category and span[1] <= record.layer <= span[2]:
                return float(value)
    if record.category in weights:
        return float(weights[record.category])
    return 1.0


DEPTH_KEY = "depth"  # the tuned table's depth factor; every other key is a tensor class


def tuned_factor(record: TensorRecord, tuning: Mapping[str, float], n_layer: int) -> float:
    """A tensor's multiplier from `bpwopt tune`: its class's factor times exp(depth · position).

    position runs from −1 at the first block to +1 at the last (0 outside the
    blocks), so a positive depth weighs late layers up and early ones down by
    the same factor. Classes without a tuned factor get 1.
    """
    factor = float(tuning.get(record.category, 1.0))
    if record.layer is not None and n_layer > 1:
        factor *= math.exp(float(tuning.get(DEPTH_KEY, 0.0)) * (2.0 * record.layer / (n_layer - 1) - 1.0))
    return factor


def tensor_weights(
    records: Mapping[str, TensorRecord], weights: Mapping[str, float], tuning: Mapping[str, float]
) -> dict[str, float]:
    """Each tensor's multiplier of its errors: its group's stored weight times its tuned factor.

    The depth position counts the blocks the state's tensors come from, so the
    optimizer and the plots place every layer alike.
    """
    n_layer = 1 + max((r.layer for r in records.values() if r.layer is not None), default=0)
    return {name: group_weight(r, weights) * tuned_factor(r, tuning, n_layer) for name, r in records.items()}


PROBE_BPW_KEY = "calibration.probe_bpw"  # in the sensitivities table: > 0 when calibrated by quantization probes


def default_objective(weights: Mapping[str, float], calibration: Mapping[str, float]) -> str:
    """The objective when none is asked for: the one the stored group weights were calibrated against.

    calibration: the state's sensitivities table. Quantization probes
    (`bpwopt calibrate`'s default) are KLD per unit of `per-weight` error, noise
    probes per unit of `relative` error; without weights, `per-weight`.
    """
    if weights and calibration.get(PROBE_BPW_KEY, 0.0) <= 0:
        return "relative"
    return DEFAULT_OBJECTIVE
