"""What the solver minimizes: how errors of different tensors are made comparable.

A measurement gives, per (tensor, type), Σ_j w_j (W_ij − Ŵ_ij)² with w the
imatrix's column weights (mean squared input activation of column j). For a
linear layer y = W x that sum is the expected squared error the quantization
adds to y per token, E‖(W − Ŵ) x‖², when activations are uncorrelated across
columns. Two ways to add those up across tensors:

* `wsse`: the absolute sums. Every tensor's error is in units of its own
  output; tensors whose outputs are large (and the embedding, which has no
  imatrix entry and is weighed by 1) dominate.
* `relative`: each sum divided by the tensor's own signal Σ_j w_j W_ij², i.e.
  the noise-to-signal ratio its output gets. Scale-free, so the attention
  projections, FFN matrices and the embedding are on one footing; this is the
  quantity the noise-injection sensitivities (`bpwopt calibrate`) are
  calibrated against, so a per-group weight turns it into predicted KLD.

Without an imatrix w = 1 and both fall back to plain squared error. Per-group
weights (sensitivities or optuna-tuned factors) multiply the tensor's terms.
The default and its evidence are in README.md and benchmarks/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bpwopt.state import Measurement, TensorRecord

OBJECTIVES = ("relative", "wsse")
DEFAULT_OBJECTIVE = "relative"


def check_objective(name: str) -> str:
    """The objective's canonical name, or ValueError naming the valid ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return name


def option_errors(
    objective: str, measurements: list[Measurement], record: TensorRecord, weight: float = 1.0
) -> np.ndarray:
    """The objective's value (float64, ≥ 0) of each measured option of one tensor, times its group weight."""
    errors = np.array([m.weighted_sse for m in measurements], dtype=np.float64)
    if check_objective(objective) == "relative":
        errors = errors / record.weight_energy if record.weight_energy > 0 else np.zeros_like(errors)
    return weight * errors


def group_weight(record: TensorRecord, weights: Mapping[str, float]) -> float:
    """A tensor's multiplier: the most specific of `name`, `category@layer`, `category` found, else 1."""
    for key in (record.name, f"{record.category}@{record.layer}", record.category):
        if key in weights:
            return float(weights[key])
    return 1.0
