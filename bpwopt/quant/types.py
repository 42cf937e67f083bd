"""The one registry of quantization types bpwopt can produce.

Every other module asks this registry for a type's ggml id, name, block size,
bytes per block, bits per weight and row kernels. Block geometry comes from
the gguf package's `GGML_QUANT_SIZES` (the file format's own table), kernels
from the per-family modules under `bpwopt.quant.kernels`. A type may also have
a `best` quantizer (`bpwopt.quant.kernels.best_rounding`): the same bytes
layout, a lower error; the rounding is chosen by name (ROUNDINGS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from bpwopt.quant.kernels import (
    best_rounding,
    best_rounding_super,
    binary,
    floats,
    fp4,
    iq1,
    iq2,
    iq2s,
    iq3,
    iq4,
    kquants_affine,
    kquants_symmetric,
    legacy,
    ternary,
)

# ggml: byte-identical to ggml_quantize_chunk; best: best_rounding's kernel where the type has one, else ggml's.
ROUNDINGS = ("ggml", "best")
DEFAULT_ROUNDING = "ggml"
# ggml_quantize_requires_imatrix: ggml aborts quantizing these without quant_weights (their grids need weights).
REQUIRES_IMATRIX = frozenset({GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ2_XS, GGMLQuantizationType.IQ1_S})


@dataclass(frozen=True)
class QuantType:
    """One ggml tensor type: its geometry and its two row kernels."""

    ggml_type: GGMLQuantizationType
    block_size: int  # elements per block
    block_bytes: int  # bytes per block
    quantize_row: Any  # Numba kernel, signature rows.QUANTIZE_ROW
    dequantize_row: Any  # Numba kernel, signature rows.DEQUANTIZE_ROW
    best_quantize_row: Any = None  # Numba kernel of `--rounding best`, same signature; None: ggml's is used

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def id(self) -> int:
        return int(self.ggml_type)

    @property
    def requires_imatrix(self) -> bool:
        return self.ggml_type in REQUIRES_IMATRIX

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size

    def quantize_kernel(self, rounding: str = DEFAULT_ROUNDING) -> Any:
        """The quantize_row kernel of a rounding (a name in ROUNDINGS)."""
        if rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
        return self.best_quantize_row if rounding == "best" and self.best_quantize_row else self.quantize_row

    def row_bytes(self, n_per_row: int) -> int:
        """Bytes of one row of n_per_row elements (n_per_row must fill whole blocks)."""
        return row_bytes(self.ggml_type, n_per_row)


def row_bytes(ggml_type: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes of one row of n_per_row elements in any ggml type, from the file format's own table."""
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    return n_per_row // block_size * block_bytes


def _build_registry() -> dict[GGMLQuantizationType, QuantType]:
    registry = {}
    best_kernels = best_rounding.KERNELS | best_rounding_super.KERNELS
    for family in (
        floats, legacy, kquants_affine, kquants_symmetric, iq1, iq2, iq2s, iq3, iq4, ternary, binary, fp4
    ):
        for ggml_type, (quantize_row, dequantize_row) in family.KERNELS.items():
            block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
            best = best_kernels.get(ggml_type)
            registry[ggml_type] = QuantType(ggml_type, block_size, block_bytes, quantize_row, dequantize_row, best)
    return dict(sorted(registry.items(), key=lambda item: int(item[0])))


QUANT_TYPES: dict[GGMLQuantizationType, QuantType] = _build_registry()


def supported_names() -> list[str]:
    return [quant_type.name for quant_type in QUANT_TYPES.values()]


def get_quant_type(qtype: str | int | GGMLQuantizationType) -> QuantType:
    """Look a type up by name (case-insensitive), ggml integer id or GGMLQuantizationType.

    Raises ValueError naming the supported types when it is not one of them.
    """
    ggml_type = None
    if isinstance(qtype, GGMLQuantizationType):
        ggml_type = qtype
    elif isinstance(qtype, str):
        ggml_type = GGMLQuantizationType.__members__.get(qtype.strip().upper())
    elif isinstance(qtype, int) and not isinstance(qtype, bool):
        ggml_type = GGMLQuantizationType._value2member_map_.get(qtype)
    if ggml_type not in QUANT_TYPES:
        raise ValueError(
            f"unsupported quantization type {qtype!r}; supported: {', '.join(supported_names())}"
        )
    return QUANT_TYPES[ggml_type]
