"""Error backends: what computes the per-row errors of a round trip through a type.

The measure stage asks a backend for Σ w(x−x̂)² and Σ (x−x̂)² of every row. The
CPU backend runs the Numba kernels the write stage uses, so a measured error
is the error of the bytes that will be written; another backend (a GPU) must
give the same numbers to within float rounding to be a drop-in.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType

from bpwopt.quant import codec
from bpwopt.quant.types import DEFAULT_ROUNDING


class ErrorBackend(Protocol):
    """Per-row (Σ w(x−x̂)², Σ (x−x̂)²) of float32 rows round-tripped through qtype, as float64 arrays."""

    def row_errors(
        self, rows: np.ndarray, qtype: GGMLQuantizationType, weights: np.ndarray | None, rounding: str
    ) -> tuple[np.ndarray, np.ndarray]: ...


class NumbaCpuBackend:
    """The byte-identical Numba kernels of bpwopt.quant, on this machine's cores."""

    def row_errors(
        self,
        rows: np.ndarray,
        qtype: GGMLQuantizationType,
        weights: np.ndarray | None,
        rounding: str = DEFAULT_ROUNDING,
    ) -> tuple[np.ndarray, np.ndarray]:
        return codec.row_errors(rows, qtype, weights, rounding)


# By name, so that a task (which must pickle) names its backend instead of carrying it.
BACKENDS: dict[str, ErrorBackend] = {"cpu": NumbaCpuBackend()}
DEFAULT_BACKEND = "cpu"
