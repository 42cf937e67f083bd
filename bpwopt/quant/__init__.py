"""Quantization: the type registry, the byte-identical Numba kernels, the codec over them, and ggml as the oracle."""
