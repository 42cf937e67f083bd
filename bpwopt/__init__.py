"""bpwopt: per-tensor quantization types for a GGUF model under a size or bits-per-weight budget."""

from bpwopt.quant.codec import dequantize, quant_error, quantize
from bpwopt.quant.types import QUANT_TYPES, QuantType, get_quant_type

__version__ = "0.1.0"

__all__ = ["QUANT_TYPES", "QuantType", "dequantize", "get_quant_type", "quant_error", "quantize"]
