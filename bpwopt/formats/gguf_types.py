"""ggml types the installed gguf package lacks, added to its type enum and size table.

gguf 0.19, the newest on PyPI, stops at Q1_0 (41); the llama.cpp that llama-cpp-python
vendors also defines Q2_0 = 42 (blocks of 64 weights: an fp16 scale and 2 bits per
weight, 18 bytes), and its llama-quantize writes it. bpwopt reads, measures and writes
tensors through gguf's `GGMLQuantizationType` and `GGML_QUANT_SIZES`, so each missing
type is added to both, with the number and geometry ggml gives it, once, when bpwopt is
imported. A gguf that has the type already is left as it is, and must agree with ggml.
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# name -> (ggml type number, elements per block, bytes per block), as ggml-common.h defines them
MISSING_TYPES = {"Q2_0": (42, 64, 18)}


def register_missing_types() -> None:
    """Add each MISSING_TYPES entry the installed gguf lacks; RuntimeError if gguf defines it otherwise."""
    for name, (number, block, size) in MISSING_TYPES.items():
        known = GGMLQuantizationType._value2member_map_.get(number)
        if known is not None:
            if known.name != name or tuple(GGML_QUANT_SIZES[known]) != (block, size):
                raise RuntimeError(f"gguf defines type {number} as {known.name}, ggml as {name} ({block}, {size})")
            continue
        # What Enum's own class construction does for each member: the value, the name, the lookups.
        member = int.__new__(GGMLQuantizationType, number)
        member._name_, member._value_ = name, number
        member.__objclass__ = GGMLQuantizationType
        GGMLQuantizationType._member_map_[name] = member
        GGMLQuantizationType._value2member_map_[number] = member
        GGMLQuantizationType._member_names_.append(name)
        type.__setattr__(GGMLQuantizationType, name, member)
        GGML_QUANT_SIZES[member] = (block, size)
