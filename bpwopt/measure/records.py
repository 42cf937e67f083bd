"""What measurement produces: a tensor's record and the error each candidate type adds to it.

They live with the measure stage, which makes them; the state stores them
and the solver read them.
"""

from __future__ import annotations

from dataclasses import dataclass


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
class Measurement:
    """The error one candidate type adds to one tensor, and what that type costs in bytes."""

    tensor: str
    qtype: str  # ggml type name
    nbytes: int  # bytes of the tensor's data in this type
    weighted_sse: float  # estimate of the whole tensor's Σ w(x−x̂)²
    sse: float  # estimate of the whole tensor's Σ (x−x̂)²
    weighted_sse_stderr: float  # standard error of weighted_sse (0 when every row was measured)
    sse_stderr: float  # standard error of sse
    rows_measured: int
    rows_total: int
    seconds: float  # wall time of the measurement
