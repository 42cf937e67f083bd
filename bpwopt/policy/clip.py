"""Which ggml type clip-quantize-cli gave each tensor of a CLIP / mmproj GGUF, as data.

The pipeline sends a file whose general.architecture is "clip" here instead of
to `bpwopt.policy.llama` (llama-quantize's rules). The rules are those of
`clip_model_quantize` in llama.cpp's `tools/mtmd/clip.cpp` (formerly
`examples/llava/clip.cpp`; removed from llama.cpp in 2025, last seen in the
copy vendored by llama-cpp-python 0.3.9): every tensor whose name ends in
"weight", is 2-D and has rows longer than one block of the requested type is
converted, tensors whose name contains "embd" to Q8_0 when the requested type
is a K-quant or newer (ggml_get_rows reads them), all other tensors are copied;
tensors keep the input's order, and general.file_type is the ggml type id
that was asked for. The result is the same `TypePlan` that `policy.plan_types`
returns, so the writer and the log do not care which tool's rules made it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from gguf.constants import GGMLQuantizationType

from bpwopt.errors import BpwoptError
from bpwopt.policy.llama import (
    QuantizeOptions,
    TensorPlan,
    TensorSpec,
    TypePlan,
    block_size,
    compile_pattern,
    n_dims,
    tensor_category,
)
from bpwopt.policy.presets import Preset

Q = GGMLQuantizationType

CLIP_ARCHITECTURE = "clip"
# clip_model_quantize's k_names: a tensor is a candidate when one of these matches its whole name.
QUANTIZED_NAMES = (re.compile(r".*weight"),)
QUANTIZED_N_DIMS = 2  # ggml_n_dims: conv kernels (4-D patch_embd) and 1-D norms/biases are copied
SOURCE_TYPES = frozenset({Q.F32, Q.F16})  # "Please use an input file in f32 or f16"
# ggml_get_rows needs a non-K type: from Q2_K on (by ggml type id), "*embd*" tensors become Q8_0.
GET_ROWS_NAME_PART = "embd"
GET_ROWS_FIRST_TYPE = Q.Q2_K
GET_ROWS_TYPE = Q.Q8_0

# llama-quantize options clip-quantize-cli never had; given for a CLIP file they are refused, not ignored.
_LLAMA_ONLY_OPTIONS: dict[str, Callable[[QuantizeOptions], bool]] = {
    "--pure": lambda o: o.pure,
    "--leave-output-tensor": lambda o: o.leave_output_tensor,
    "--output-tensor-type": lambda o: o.output_tensor_type is not None,
    "--token-embedding-type": lambda o: o.token_embedding_type is not None,
    "--tensor-type": lambda o: bool(o.tensor_types),
    "--prune-layers": lambda o: bool(o.prune_layers),
    "--imatrix": lambda o: o.imatrix_names is not None,
}


def clip_allows_quantization(spec: TensorSpec, requested: GGMLQuantizationType) -> bool:
    """Whether clip-quantize-cli converted this tensor: a 2-D "…weight" with rows longer than one block."""
    named = any(pattern.fullmatch(spec.name) for pattern in QUANTIZED_NAMES)
    return named and n_dims(spec.shape) == QUANTIZED_N_DIMS and spec.row_length > block_size(requested)


def clip_tensor_type(name: str, requested: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type of a converted tensor: the requested one, or Q8_0 for K-quant embedding tables."""
    if int(requested) >= int(GET_ROWS_FIRST_TYPE) and GET_ROWS_NAME_PART in name:
        return GET_ROWS_TYPE
    return requested


def check_clip_options(options: QuantizeOptions) -> None:
    """Raise BpwoptError for a llama-quantize option that clip-quantize-cli did not have."""
    given = [flag for flag, is_set in _LLAMA_ONLY_OPTIONS.items() if is_set(options)]
    if given:
        raise BpwoptError(f"{given[0]} does not apply to a CLIP / mmproj file (clip-quantize-cli had no such option)")


def plan_clip_types(specs: Sequence[TensorSpec], preset: Preset, options: QuantizeOptions | None = None) -> TypePlan:
    """clip-quantize-cli's type for every tensor of a CLIP / mmproj file, in the input's order.

    preset.base_type is the requested ggml type (an integer TYPE reads as a ggml
    type id for CLIP files). `--ignore REGEX` keeps matching tensors as they are;
    `--allow-requantize` lets tensors that are not F32 or F16 be converted,
    which the old tool refused. A tensor whose row length is no multiple of the block (the
    old tool aborted) keeps its type and counts as a fallback.
    """
    options = options or QuantizeOptions()
    check_clip_options(options)
    requested = preset.base_type
    ignores = [compile_pattern(p.removeprefix("re:"), "--ignore") for p in options.ignore]
    planned = [_plan_tensor(spec, preset, requested, ignores, options) for spec in specs]
    return TypePlan(
        preset=preset,
        tensors=tuple(plan for plan, _ in planned),
        pruned=(),
        block_count=None,
        file_type=None if preset.only_copy else int(requested),
        n_fallback=sum(fell_back for _, fell_back in planned),
        has_imatrix=False,
    )


def _plan_tensor(
    spec: TensorSpec,
    preset: Preset,
    requested: GGMLQuantizationType,
    ignores: list[re.Pattern[str]],
    options: QuantizeOptions,
) -> tuple[TensorPlan, bool]:
    """One tensor's TensorPlan, and whether its row length forced it to keep its type."""
    quantizable = not preset.only_copy and clip_allows_quantization(spec, requested)
    target, reason, pinned, fell_back = spec.source_type, "not converted by clip-quantize-cli", False, False
    if preset.only_copy:
        reason = "COPY"
    elif quantizable and any(pattern.search(spec.name) for pattern in ignores):
        reason, pinned = "--ignore", True
    elif quantizable:
        _check_source_type(spec, options)
        wanted = clip_tensor_type(spec.name, requested)
        if spec.row_length % block_size(wanted) == 0:
            target, reason = wanted, "clip-quantize-cli"
        else:
            reason = f"row length {spec.row_length} not a multiple of {block_size(wanted)} for {wanted.name}: kept"
            fell_back = True
    plan = TensorPlan(
        source_name=spec.name,
        name=spec.name,
        shape=spec.shape,
        category=tensor_category(spec.name),
        source_type=spec.source_type,
        target_type=target,
        quantizable=quantizable,
        pinned=pinned,
        uses_imatrix=False,
        requires_imatrix=False,
        reason=reason,
    )
    return plan, fell_back


def _check_source_type(spec: TensorSpec, options: QuantizeOptions) -> None:
    """clip-quantize-cli converted only F32 and F16 tensors; --allow-requantize (bpwopt's extension) lifts that."""
    if spec.source_type in SOURCE_TYPES or options.allow_requantize:
        return
    raise BpwoptError(
        f"{spec.name} is {spec.source_type.name}: CLIP quantization needs an F32 or F16 input "
        "(as clip-quantize-cli did); pass --allow-requantize to convert it anyway"
    )
