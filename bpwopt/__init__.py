"""bpwopt: per-tensor quantization types for a GGUF model under a size or bits-per-weight budget."""

from bpwopt.formats.gguf_types import register_missing_types

register_missing_types()  # before any module builds tables of gguf's types

from bpwopt.quant.codec import dequantize, quant_error, quantize  # noqa: E402
from bpwopt.quant.types import QUANT_TYPES, QuantType, get_quant_type  # noqa: E402

__version__ = "0.1.0"

__all__ = ["QUANT_TYPES", "QuantType", "dequantize", "get_quant_type", "quant_error", "quantize"]
