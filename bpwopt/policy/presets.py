"""llama-quantize's presets (ftypes) as one table, and the reading of the TYPE argument.

The command line's TYPE names a preset ("Q4_K_M", "q8_0", "COPY"), a ggml
type, or an integer, exactly as the tool bpwopt replaces read it (SPEC,
"Command line"). The preset then goes to `bpwopt.policy.llama`, which turns it into
one ggml type per tensor. Rows, ids and help texts follow llama.cpp's
`include/llama.h` (enum llama_ftype), `tools/quantize/quantize.cpp`
(QUANT_OPTIONS) and `src/llama-quant.cpp` (llama_ftype_get_default_type).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

from gguf.constants import GGMLQuantizationType

from bpwopt.errors import BpwoptError

Q = GGMLQuantizationType


class Ftype(IntEnum):
    """llama.cpp's llama_ftype: the id written to general.file_type and read from an integer TYPE."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 7
    Q5_0 = 8
    Q5_1 = 9
    Q2_K = 10
    Q3_K_S = 11
    Q3_K_M = 12
    Q3_K_L = 13
    Q4_K_S = 14
    Q4_K_M = 15
    Q5_K_S = 16
    Q5_K_M = 17
    Q6_K = 18
    IQ2_XXS = 19
    IQ2_XS = 20
    Q2_K_S = 21
    IQ3_XS = 22
    IQ3_XXS = 23
    IQ1_S = 24
    IQ4_NL = 25
    IQ3_S = 26
    IQ3_M = 27
    IQ2_S = 28
    IQ2_M = 29
    IQ4_XS = 30
    IQ1_M = 31
    BF16 = 32
    TQ1_0 = 36
    TQ2_0 = 37
    MXFP4_MOE = 38
    Q1_0 = 40
    Q2_0 = 41


# llama_ftype_get_default_type: the type every quantizable tensor starts from.
# Note IQ2_S starts from IQ2_XS and IQ2_M from IQ2_S, as in llama.cpp.
BASE_TYPES: dict[Ftype, GGMLQuantizationType] = {
    Ftype.F32: Q.F32,
    Ftype.F16: Q.F16,
    Ftype.BF16: Q.BF16,
    Ftype.Q4_0: Q.Q4_0,
    Ftype.Q4_1: Q.Q4_1,
    Ftype.Q5_0: Q.Q5_0,
    Ftype.Q5_1: Q.Q5_1,
    Ftype.Q8_0: Q.Q8_0,
    Ftype.Q1_0: Q.Q1_0,
    Ftype.Q2_0: Q.Q2_0,
    Ftype.MXFP4_MOE: Q.MXFP4,
    Ftype.Q2_K: Q.Q2_K,
    Ftype.Q2_K_S: Q.Q2_K,
    Ftype.IQ3_XS: Q.IQ3_S,
    Ftype.Q3_K_S: Q.Q3_K,
    Ftype.Q3_K_M: Q.Q3_K,
    Ftype.Q3_K_L: Q.Q3_K,
    Ftype.Q4_K_S: Q.Q4_K,
    Ftype.Q4_K_M: Q.Q4_K,
    Ftype.Q5_K_S: Q.Q5_K,
    Ftype.Q5_K_M: Q.Q5_K,
    Ftype.Q6_K: Q.Q6_K,
    Ftype.TQ1_0: Q.TQ1_0,
    Ftype.TQ2_0: Q.TQ2_0,
    Ftype.IQ2_XXS: Q.IQ2_XXS,
    Ftype.IQ2_XS: Q.IQ2_XS,
    Ftype.IQ2_S: Q.IQ2_XS,
    Ftype.IQ2_M: Q.IQ2_S,
    Ftype.IQ3_XXS: Q.IQ3_XXS,
    Ftype.IQ1_S: Q.IQ1_S,
    Ftype.IQ1_M: Q.IQ1_M,
    Ftype.IQ4_NL: Q.IQ4_NL,
    Ftype.IQ4_XS: Q.IQ4_XS,
    Ftype.IQ3_S: Q.IQ3_S,
    Ftype.IQ3_M: Q.IQ3_S,
}


@dataclass(frozen=True)
class Preset:
    """One row of llama-quantize's QUANT_OPTIONS: a TYPE name and the ftype it selects."""

    name: str  # spelled as llama-quantize spells it; also names the default output file
    ftype: Ftype
    description: str  # llama-quantize's help text (size and perplexity on Llama-3-8B, or bpw)

    @property
    def base_type(self) -> GGMLQuantizationType:
        """The type a quantizable tensor gets before the preset's per-tensor bumps."""
        return BASE_TYPES[self.ftype]

    @property
    def only_copy(self) -> bool:
        """COPY rewrites the file with every tensor as it is (llama_model_quantize_params.only_copy)."""
        return self.name == "COPY"


# QUANT_OPTIONS, in its order: an integer TYPE selects the first row with that ftype,
# so 12 reads as "Q3_K" and 0 as "F32" (COPY must stay after F32).
PRESETS: tuple[Preset, ...] = (
    Preset("Q1_0", Ftype.Q1_0, " 1.125 bpw quantization"),
    Preset("Q2_0", Ftype.Q2_0, " 2.25 bpw quantization (group 64)"),
    Preset("Q4_0", Ftype.Q4_0, " 4.34G, +0.4685 ppl @ Llama-3-8B"),
    Preset("Q4_1", Ftype.Q4_1, " 4.78G, +0.4511 ppl @ Llama-3-8B"),
    Preset("MXFP4_MOE", Ftype.MXFP4_MOE, " MXFP4 MoE"),
    Preset("Q5_0", Ftype.Q5_0, " 5.21G, +0.1316 ppl @ Llama-3-8B"),
    Preset("Q5_1", Ftype.Q5_1, " 5.65G, +0.1062 ppl @ Llama-3-8B"),
    Preset("IQ2_XXS", Ftype.IQ2_XXS, " 2.06 bpw quantization"),
    Preset("IQ2_XS", Ftype.IQ2_XS, " 2.31 bpw quantization"),
    Preset("IQ2_S", Ftype.IQ2_S, " 2.5  bpw quantization"),
    Preset("IQ2_M", Ftype.IQ2_M, " 2.7  bpw quantization"),
    Preset("IQ1_S", Ftype.IQ1_S, " 1.56 bpw quantization"),
    Preset("IQ1_M", Ftype.IQ1_M, " 1.75 bpw quantization"),
    Preset("TQ1_0", Ftype.TQ1_0, " 1.69 bpw ternarization"),
    Preset("TQ2_0", Ftype.TQ2_0, " 2.06 bpw ternarization"),
    Preset("Q2_K", Ftype.Q2_K, " 2.96G, +3.5199 ppl @ Llama-3-8B"),
    Preset("Q2_K_S", Ftype.Q2_K_S, " 2.96G, +3.1836 ppl @ Llama-3-8B"),
    Preset("IQ3_XXS", Ftype.IQ3_XXS, " 3.06 bpw quantization"),
    Preset("IQ3_S", Ftype.IQ3_S, " 3.44 bpw quantization"),
    Preset("IQ3_M", Ftype.IQ3_M, " 3.66 bpw quantization mix"),
    Preset("Q3_K", Ftype.Q3_K_M, "alias for Q3_K_M"),
    Preset("IQ3_XS", Ftype.IQ3_XS, " 3.3 bpw quantization"),
    Preset("Q3_K_S", Ftype.Q3_K_S, " 3.41G, +1.6321 ppl @ Llama-3-8B"),
    Preset("Q3_K_M", Ftype.Q3_K_M, " 3.74G, +0.6569 ppl @ Llama-3-8B"),
    Preset("Q3_K_L", Ftype.Q3_K_L, " 4.03G, +0.5562 ppl @ Llama-3-8B"),
    Preset("IQ4_NL", Ftype.IQ4_NL, " 4.50 bpw non-linear quantization"),
    Preset("IQ4_XS", Ftype.IQ4_XS, " 4.25 bpw non-linear quantization"),
    Preset("Q4_K", Ftype.Q4_K_M, "alias for Q4_K_M"),
    Preset("Q4_K_S", Ftype.Q4_K_S, " 4.37G, +0.2689 ppl @ Llama-3-8B"),
    Preset("Q4_K_M", Ftype.Q4_K_M, " 4.58G, +0.1754 ppl @ Llama-3-8B"),
    Preset("Q5_K", Ftype.Q5_K_M, "alias for Q5_K_M"),
    Preset("Q5_K_S", Ftype.Q5_K_S, " 5.21G, +0.1049 ppl @ Llama-3-8B"),
    Preset("Q5_K_M", Ftype.Q5_K_M, " 5.33G, +0.0569 ppl @ Llama-3-8B"),
    Preset("Q6_K", Ftype.Q6_K, " 6.14G, +0.0217 ppl @ Llama-3-8B"),
    Preset("Q8_0", Ftype.Q8_0, " 7.96G, +0.0026 ppl @ Llama-3-8B"),
    Preset("F16", Ftype.F16, "14.00G, +0.0020 ppl @ Mistral-7B"),
    Preset("BF16", Ftype.BF16, "14.00G, -0.0050 ppl @ Mistral-7B"),
    Preset("F32", Ftype.F32, "26.00G              @ 7B"),
    Preset("COPY", Ftype.F32, "only copy tensors, no quantizing"),
)

PRESETS_BY_NAME: dict[str, Preset] = {preset.name: preset for preset in PRESETS}

# clip-quantize-cli read its integer TYPE as a ggml type id and accepted only these.
CLIP_TYPE_IDS: dict[int, GGMLQuantizationType] = {2: Q.Q4_0, 3: Q.Q4_1, 6: Q.Q5_0, 7: Q.Q5_1, 8: Q.Q8_0}

_INTEGER = re.compile(r"[+-]?\d+")
CLIP_READING = "ggml type id (CLIP file)"


@dataclass(frozen=True)
class TypeChoice:
    """What a TYPE argument selected, and how it was read (for the log line)."""

    text: str  # the argument as given
    preset: Preset
    reading: str  # "preset name", "ggml type name", "llama ftype id" or "ggml type id (CLIP file)"

    def describe(self) -> str:
        """One log line, e.g. "TYPE '7' read as a llama ftype id: Q8_0 (llama ftype 7)"."""
        if self.reading == CLIP_READING:
            number = f"ggml type {int(self.preset.base_type)}"
        else:
            number = f"llama ftype {int(self.preset.ftype)}"
        return f"TYPE {self.text!r} read as a {self.reading}: {self.preset.name} ({number})"


def parse_type_argument(text: str, is_clip: bool) -> TypeChoice:
    """Read TYPE as llama-quantize (language model) or clip-quantize-cli (CLIP / mmproj) did.

    A preset name wins over everything (case-insensitive). An integer is a llama
    ftype id for a language model but a ggml type id for a CLIP file, because
    that is what each of the two replaced tools meant by it. A ggml type name
    that is no preset name selects the first preset built on that type.
    Raises BpwoptError with the valid choices when nothing matches.
    """
    stripped = text.strip()
    preset = PRESETS_BY_NAME.get(stripped.upper())
    if preset is not None:
        return TypeChoice(text, preset, "preset name")
    if _INTEGER.fullmatch(stripped):
        return _parse_integer(text, int(stripped), is_clip)
    ggml_type = Q.__members__.get(stripped.upper())
    preset = next((p for p in PRESETS if ggml_type is not None and p.base_type == ggml_type), None)
    if preset is not None:
        return TypeChoice(text, preset, "ggml type name")
    raise BpwoptError(f"unknown quantization type {text!r}; {_valid_choices(is_clip)}")


def _parse_integer(text: str, number: int, is_clip: bool) -> TypeChoice:
    if is_clip:
        ggml_type = CLIP_TYPE_IDS.get(number)
        if ggml_type is None:
            raise BpwoptError(f"unknown quantization type {text!r} for a CLIP file; {_valid_choices(True)}")
        return TypeChoice(text, PRESETS_BY_NAME[ggml_type.name], CLIP_READING)
    preset = next((p for p in PRESETS if p.ftype == number), None)
    if preset is None:
        raise BpwoptError(f"unknown quantization type {text!r}; {_valid_choices(False)}")
    return TypeChoice(text, preset, "llama ftype id")


def _valid_choices(is_clip: bool) -> str:
    names = ", ".join(preset.name for preset in PRESETS)
    if is_clip:
        ids = ", ".join(f"{number}={ggml_type.name}" for number, ggml_type in CLIP_TYPE_IDS.items())
        return f"valid: a ggml type id ({ids}) or a preset name ({names})"
    ids = ", ".join(sorted({str(int(preset.ftype)) for preset in PRESETS}, key=int))
    return f"valid: {names} (case-insensitive) or a llama ftype id ({ids})"


def parse_ggml_type_name(text: str) -> GGMLQuantizationType:
    """A ggml type by name, case-insensitive, as --output-tensor-type / --tensor-type take it."""
    ggml_type = Q.__members__.get(text.strip().upper())
    if ggml_type is None:
        raise BpwoptError(f"invalid ggml type {text!r}; valid: {', '.join(Q.__members__)}")
    return ggml_type


def format_presets_help() -> str:
    """The "allowed quantization types" listing of llama-quantize's usage, one preset a line."""
    lines = []
    for preset in PRESETS:
        number = "          " if preset.only_copy else f"  {int(preset.ftype):2d}  or  "
        lines.append(f"{number}{preset.name:<7s} : {preset.description}")
    return "\n".join(lines)
