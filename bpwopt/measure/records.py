"""What measurement produces: a tensor's record and the statistics of each candidate type's error.

They live with the measure stage, which makes them; the state stores them
and the solver reads them. A measurement's statistics are named (STATISTICS),
so a new one is a new name, not a new field: state files written before it
existed still open, and the pairs that lack it are measured again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Every statistic the measure stage computes per (tensor, type), and what it estimates.
STATISTICS = {
    "weighted_sse": "Σ w(x−x̂)² over the whole tensor, w the imatrix's column weights (1 without one)",
    "sse": "Σ (x−x̂)² over the whole tensor",
}


@dataclass(frozen=True)
class TensorRecord:
    """A measured tensor as the solver needs it; energies make its errors relative."""

    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row length
    elements: int
    source_type: str  # ggml type name in the input file
    category: str  # tensor class (attn_v, ffn_down, output, ...)
    layer: int | None  # block index, None outside the blocks
    weight_energy: float  # Σ w x² of the tensor (imatrix-weighted, or plain without one)
    plain_energy: float  # Σ x²


@dataclass(frozen=True)
class Estimate:
    """A whole-tensor estimate from the measured rows, and its standard error (0 when every row was measured)."""

    value: float
    stderr: float


@dataclass(frozen=True)
class Measurement:
    """The error one candidate type adds to one tensor, and what that type costs in bytes."""

    tensor: str
    qtype: str  # ggml type name
    nbytes: int  # bytes of the tensor's data in this type
    statistics: Mapping[str, Estimate]  # by STATISTICS name
    rows_measured: int
    rows_total: int
    seconds: float  # wall time of the measurement

    def value(self, statistic: str) -> float:
        """The estimate of one statistic (KeyError if this measurement lacks it)."""
        return self.statistics[statistic].value
