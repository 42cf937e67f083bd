"""Which ggml type llama-quantize gives each tensor: llama.cpp's policy, as tables.

The pipeline reads a GGUF (`read_model_info`, `read_tensor_specs`), picks a
preset (`bpwopt.policy.presets`), and asks `plan_types` for a `TypePlan`: one target
type per tensor, in the order llama.cpp writes them, which the writer consumes
and the optimizer starts from (it also reads each tensor's `Category`). The
decisions reproduce `src/llama-quant.cpp` — tensor_allows_quantization,
tensor_get_category, llama_tensor_get_type_impl, tensor_type_fallback,
llama_tensor_get_type and the driver's requantize / imatrix refusals — but the
per-preset bumps live in `RULE_GROUPS`, rows of data applied by one small
function, instead of nested ifs.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from bpwopt.errors import BpwoptError
from bpwopt.policy.presets import Ftype, Preset, parse_ggml_type_name
from bpwopt.quant.types import QUANT_TYPES

Q = GGMLQuantizationType
F = Ftype


# ---------------------------------------------------------------------------
# Categories (tensor_get_category)
# ---------------------------------------------------------------------------


class Category(enum.Enum):
    """llama.cpp's broad role of a tensor; the policy's rules and the optimizer key on it."""

    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"  # norms, biases, routers, and everything else


_CATEGORY_BY_EXACT_NAME = {
    "output.weight": Category.OUTPUT,
    "token_embd.weight": Category.TOKEN_EMBD,
    "per_layer_token_embd.weight": Category.TOKEN_EMBD,
}
# Checked in this order; the first substring found decides (so "ffn_down_exps" is FFN_DOWN).
_CATEGORY_BY_SUBSTRING = (
    ("attn_qkv.weight", Category.ATTN_QKV),
    ("attn_kv_b.weight", Category.ATTN_KV_B),
    ("attn_v.weight", Category.ATTN_V),
    ("attn_k.weight", Category.ATTN_K),
    ("attn_q.weight", Category.ATTN_Q),
    ("attn_output.weight", Category.ATTN_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)
# Tensors that, like attn_v, carry the value projection: they share attn_v's rules and counter.
ATTN_V_LIKE = frozenset({Category.ATTN_V, Category.ATTN_QKV, Category.ATTN_KV_B})
_FFN = frozenset({Category.FFN_UP, Category.FFN_GATE, Category.FFN_DOWN})


def tensor_category(name: str) -> Category:
    """The category llama.cpp's quantizer gives a tensor name (tensor_get_category)."""
    if name in _CATEGORY_BY_EXACT_NAME:
        return _CATEGORY_BY_EXACT_NAME[name]
    return next((cat for part, cat in _CATEGORY_BY_SUBSTRING if part in name), Category.OTHER)


# ---------------------------------------------------------------------------
# Which tensors may be quantized at all (tensor_allows_quantization)
# ---------------------------------------------------------------------------

# Small or special matrices llama.cpp always keeps in their source type.
_NEVER_QUANTIZED_SUBSTRINGS = (
    "_norm.weight",
    "ffn_gate_inp.weight",  # MoE router
    "ffn_gate_tid2eid.weight",  # DeepSeek-V4 i32 routing table
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",  # T5 relative position bias
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")  # BERT
_NEVER_QUANTIZED_SUBSTRINGS_BY_ARCH = {
    "glm5-next": (
        "hc_",
        "indexer.attn_q_b",
        "indexer.attn_k",
        "indexer.proj",
        "indexer_compressor_gate",
        "indexer_compressor_ape",
        "ssm_f_a.weight",
        "ssm_f_b.weight",
        "ssm_g_a.weight",
        "ssm_g_b.weight",
        "ssm_beta.weight",
        "attn_kv_a_mqa.weight",
        "attn_k_b.weight",
        "attn_v_b.weight",
    ),
}


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: dimensions up to the last one larger than 1 (a [4096, 1] tensor is 1-D)."""
    return max((i + 1 for i, size in enumerate(shape) if size > 1), default=1)


def tensor_allows_quantization(
    name: str,
    shape: Sequence[int],
    architecture: str,
    *,
    leave_output_tensor: bool = False,
    only_copy: bool = False,
) -> bool:
    """Whether llama-quantize may change this tensor's type at all; if not, it is copied as is.

    Only 2-D and 3-D (expert) matrices whose names end in "weight" qualify, minus
    norms, routers and the small or positional tables listed above.
    """
    if only_copy or n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if leave_output_tensor and name == "output.weight":
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    excluded = _NEVER_QUANTIZED_SUBSTRINGS + _NEVER_QUANTIZED_SUBSTRINGS_BY_ARCH.get(architecture, ())
    return not any(part in name for part in excluded)


# ---------------------------------------------------------------------------
# Row length not a multiple of the block (tensor_type_fallback)
# ---------------------------------------------------------------------------

# 256-element types step down to a 32-element type of about the same size.
FALLBACK_TYPES: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    Q.IQ1_S: Q.IQ4_NL,
    Q.IQ1_M: Q.IQ4_NL,
    Q.IQ2_XXS: Q.IQ4_NL,
    Q.IQ2_XS: Q.IQ4_NL,
    Q.IQ2_S: Q.IQ4_NL,
    Q.IQ3_XXS: Q.IQ4_NL,
    Q.IQ3_S: Q.IQ4_NL,
    Q.IQ4_XS: Q.IQ4_NL,
    Q.Q2_0: Q.Q4_0,
    Q.Q2_K: Q.Q4_0,
    Q.Q3_K: Q.Q4_0,
    Q.TQ1_0: Q.Q4_0,
    Q.TQ2_0: Q.Q4_0,
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}


def block_size(ggml_type: GGMLQuantizationType) -> int:
    """Elements per block of a ggml type (1 for F32, F16, BF16)."""
    return GGML_QUANT_SIZES[ggml_type][0]


def is_quantized(ggml_type: GGMLQuantizationType) -> bool:
    """ggml_is_quantized: block types (Q*, IQ*, TQ*, MXFP4…), not F32/F16/BF16 or integers."""
    return block_size(ggml_type) > 1


def fallback_type(target: GGMLQuantizationType, row_length: int) -> GGMLQuantizationType:
    """The type llama.cpp writes when row_length (ne0) is not a multiple of target's block.

    The step-down is FALLBACK_TYPES; a 32-block type keeps itself; when even the
    fallback does not fit (row length not a multiple of 32), F16.
    """
    if row_length % block_size(target) == 0:
        return target
    if target in FALLBACK_TYPES:
        chosen = FALLBACK_TYPES[target]
    elif block_size(target) <= 32:
        chosen = target
    else:
        raise BpwoptError(f"no tensor type fallback is defined for type {target.name}")
    return chosen if row_length % block_size(chosen) == 0 else Q.F16


# ---------------------------------------------------------------------------
# Model facts the rules read
# ---------------------------------------------------------------------------


def _is_70b(model: ModelInfo) -> bool:
    """llama.cpp's LLM_TYPE_70B, the only model size its quantizer looks at."""
    layer_count = _LLM_TYPE_70B_LAYERS.get(model.architecture)
    if layer_count is None or model.n_layer != layer_count:
        return False
    if model.architecture == "llama":  # llama with 80 layers is 65B without GQA, 8x… with 8 experts
        return model.n_expert != 8 and model.n_head != model.n_head_kv
    return True


_LLM_TYPE_70B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


@dataclass(frozen=True)
class ModelInfo:
    """The hyperparameters llama.cpp's type policy reads, from the GGUF metadata."""

    architecture: str  # general.architecture
    n_layer_all: int  # {arch}.block_count, MTP layers included
    n_layer_nextn: int = 0  # {arch}.nextn_predict_layers
    n_expert: int = 0  # {arch}.expert_count
    n_head: int = 0  # {arch}.attention.head_count (layer 0)
    n_head_kv: int = 0  # {arch}.attention.head_count_kv (layer 0), defaults to n_head

    @property
    def n_layer(self) -> int:
        """Layers without the next-token-prediction ones (hparams.n_layer())."""
        return self.n_layer_all - self.n_layer_nextn

    @property
    def n_gqa(self) -> int:
        """Query heads per key/value head; 0 when unknown."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, which gets a bigger attn_v."""
        return _is_70b(self)


def _field_value(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value[0] if isinstance(value, list) else value  # per-layer arrays: layer 0


def read_model_info(reader: gguf.GGUFReader) -> ModelInfo:
    """ModelInfo from an open GGUF; BpwoptError when it has no architecture or block count."""
    architecture = _field_value(reader, "general.architecture")
    if architecture is None:
        raise BpwoptError("the GGUF has no general.architecture")
    if architecture == "clip":  # CLIP / mmproj: no LLM hyperparameters; bpwopt.policy.clip plans these
        return ModelInfo(architecture="clip", n_layer_all=int(_field_value(reader, "clip.vision.block_count", 0)))
    n_layer_all = _field_value(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=architecture))
    if n_layer_all is None:
        raise BpwoptError(f"the GGUF has no {architecture}.block_count; llama.cpp's type policy needs it")
    n_head = int(_field_value(reader, gguf.Keys.Attention.HEAD_COUNT.format(arch=architecture), 0))
    return ModelInfo(
        architecture=str(architecture),
        n_layer_all=int(n_layer_all),
        n_layer_nextn=int(_field_value(reader, gguf.Keys.LLM.NEXTN_PREDICT_LAYERS.format(arch=architecture), 0)),
        n_expert=int(_field_value(reader, gguf.Keys.LLM.EXPERT_COUNT.format(arch=architecture), 0)),
        n_head=n_head,
        n_head_kv=int(_field_value(reader, gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=architecture), n_head)),
    )


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the policy sees it."""

    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first, then rows, then experts
    source_type: GGMLQuantizationType

    @property
    def row_length(self) -> int:
        """Elements per row (ne0): what the block size must divide."""
        return self.shape[0]


def read_tensor_specs(reader: gguf.GGUFReader) -> list[TensorSpec]:
    """Every tensor of an open GGUF, in file order (shard by shard for a split model)."""
    return [
        TensorSpec(t.name, tuple(int(size) for size in t.shape), GGMLQuantizationType(t.tensor_type))
        for t in reader.tensors
    ]


# ---------------------------------------------------------------------------
# Options (llama_model_quantize_params and llama-quantize's flags)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeOptions:
    """llama-quantize's flags that change tensor types, with their meaning unchanged."""

    pure: bool = False  # --pure: no per-tensor bumps, base type everywhere
    leave_output_tensor: bool = False  # --leave-output-tensor: output.weight keeps its type
    output_tensor_type: GGMLQuantizationType | None = None  # --output-tensor-type
    token_embedding_type: GGMLQuantizationType | None = None  # --token-embedding-type
    # --tensor-type REGEX=TYPE, in order; the first regex found in a tensor name wins
    tensor_types: tuple[tuple[str, GGMLQuantizationType], ...] = ()
    allow_requantize: bool = False  # --allow-requantize
    prune_layers: tuple[int, ...] = ()  # --prune-layers: block ids removed, later blocks renumbered
    imatrix_names: frozenset[str] | None = None  # entry names of --imatrix FILE; None without one
    include_weights: tuple[str, ...] = ()  # --include-weights: use imatrix only for names containing these
    exclude_weights: tuple[str, ...] = ()  # --exclude-weights: never for names containing these
    ignore: tuple[str, ...] = ()  # --ignore REGEX (bpwopt's own): matching tensors keep their source type
    # --keep-split: tensors planned and written shard by shard in file order, not in name order; the
    # running layer counts follow that order, so types can differ (llama.cpp sorts by shard and offset)
    keep_split: bool = False


def parse_tensor_type_option(text: str) -> tuple[str, GGMLQuantizationType]:
    """One --tensor-type NAME=TYPE; the name is lower-cased as llama-quantize does."""
    pattern, separator, type_name = text.partition("=")
    if not separator or not pattern or not type_name:
        raise BpwoptError(f"malformed --tensor-type {text!r}; expected REGEX=TYPE, e.g. attn_q=q8_0")
    return pattern.lower(), parse_ggml_type_name(type_name)


def kept_imatrix_names(
    names: Collection[str], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> frozenset[str]:
    """The imatrix entries llama-quantize keeps after --include-weights / --exclude-weights.

    Both match by substring. An empty result means "no imatrix" for the policy too.
    """
    if include and exclude:
        raise BpwoptError("--include-weights and --exclude-weights cannot be used together")
    kept = {name for name in names if not any(part in name for part in exclude)}
    if include:
        kept = {name for name in kept if any(part in name for part in include)}
    return frozenset(kept)


# ---------------------------------------------------------------------------
# The rules (llama_tensor_get_type_impl) as data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Situation:
    """Everything a rule may look at for one tensor."""

    ftype: Ftype
    category: Category  # OUTPUT also for a token_embd that doubles as the output (tied)
    name: str
    row_length: int  # ne0
    n_matrices: int  # ne2: experts stacked in one tensor
    model: ModelInfo
    has_imatrix: bool
    current_type: GGMLQuantizationType  # the type so far (the preset's base type, then each bump)
    output_tensor_type: GGMLQuantizationType | None
    position: int = 0  # layer position counted by the rule group (RuleGroup.counter)
    n_positions: int = 0  # how many positions there are


Predicate = Callable[[Situation], bool]


def _always(s: Situation) -> bool:
    return True


def _first_eighth(s: Situation) -> bool:
    return s.position < s.n_positions // 8


def _first_sixteenth(s: Situation) -> bool:
    return s.position < s.n_positions // 16


def _middle(s: Situation) -> bool:
    """Neither in the first nor in the last eighth."""
    return s.n_positions // 8 <= s.position < 7 * s.n_positions // 8


def _more_bits(s: Situation) -> bool:
    """use_more_bits: first and last eighth, and every third layer in between."""
    i, n = s.position, s.n_positions
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _gqa_4(s: Situation) -> bool:
    return s.model.n_gqa >= 4


def _experts_8(s: Situation) -> bool:
    return s.model.n_expert == 8


def _falcon(s: Situation) -> bool:
    return s.model.architecture == "falcon"


def _imatrix(s: Situation) -> bool:
    return s.has_imatrix


def _not(predicate: Predicate) -> Predicate:
    return lambda s: not predicate(s)


def _all(*predicates: Predicate) -> Predicate:
    return lambda s: all(p(s) for p in predicates)


def _any(*predicates: Predicate) -> Predicate:
    return lambda s: any(p(s) for p in predicates)


def _position_below(limit: int) -> Predicate:
    return lambda s: s.position < limit


def _type_is(*types: GGMLQuantizationType) -> Predicate:
    return lambda s: s.current_type in types


def _row_not_in_blocks(s: Situation) -> bool:
    """The row length is no multiple of the current type's block."""
    return s.row_length % block_size(s.current_type) != 0


def _output_type_given(s: Situation) -> bool:
    return s.output_tensor_type is not None


def _the_output_tensor_type(s: Situation) -> GGMLQuantizationType:
    assert s.output_tensor_type is not None
    return s.output_tensor_type


def _stacked_experts(s: Situation) -> bool:
    """A 3-D expert tensor (bailingmoe3's 3-D MLA projections do not count)."""
    return s.n_matrices > 1 and (s.model.architecture != "bailingmoe3" or s.category in _FFN)


@dataclass(frozen=True)
class Rule:
    """One bump: for these ftypes (None: any), when `when` holds, the tensor gets `to`."""

    ftypes: frozenset[Ftype] | None
    to: GGMLQuantizationType | Callable[[Situation], GGMLQuantizationType]
    when: Predicate = _always
    why: str = ""

    def applies(self, s: Situation) -> bool:
        """Whether this rule decides the tensor in situation s."""
        return (self.ftypes is None or s.ftype in self.ftypes) and self.when(s)

    def result(self, s: Situation) -> GGMLQuantizationType:
        """The type the rule gives (most rules name it; one reads it from the options)."""
        return self.to if isinstance(self.to, GGMLQuantizationType) else self.to(s)

    def explained(self, group: RuleGroup) -> str:
        """Why, for logs: "attn_v: first two attn_v"."""
        return f"{group.name}: {self.why}" if self.why else group.name


def _rule(
    ftypes: Ftype | Collection[Ftype] | None,
    to: GGMLQuantizationType | Callable[[Situation], GGMLQuantizationType],
    when: Predicate = _always,
    why: str = "",
) -> Rule:
    if isinstance(ftypes, Ftype):
        ftypes = {ftypes}
    return Rule(None if ftypes is None else frozenset(ftypes), to, when, why)


@dataclass(frozen=True)
class RuleGroup:
    """One branch of llama.cpp's chain: the tensors it governs and its rules.

    The first group that governs a tensor is the only one consulted. Within it
    the first applicable rule sets the type (none: the type stays), then every
    applicable `then` rule overrides it in turn. `counter` names the running
    count of governed tensors that serves as layer position (llama.cpp's
    i_attention_wv, i_ffn_down…); with `layer_from_name`, MoE models read the
    layer from "blk.N." instead, since their expert tensors are not in layer order.
    """

    name: str
    categories: frozenset[Category] | None = None  # None: any
    ftypes: frozenset[Ftype] | None = None  # None: any
    when: Predicate = _always
    rules: tuple[Rule, ...] = ()
    then: tuple[Rule, ...] = ()
    counter: str | None = None
    layer_from_name: bool = False

    def governs(self, s: Situation) -> bool:
        """Whether this branch of the chain is the one that decides the tensor."""
        return (
            (self.categories is None or s.category in self.categories)
            and (self.ftypes is None or s.ftype in self.ftypes)
            and self.when(s)
        )


# The very-low-bit IQ presets share one branch of their own.
IQ_LOW_FTYPES = frozenset({F.IQ2_XXS, F.IQ2_XS, F.IQ1_S, F.IQ2_S, F.IQ2_M, F.IQ1_M})
_IQ2_S_M = {F.IQ2_S, F.IQ2_M}
_IQ1_IQ2_XXS_XS = {F.IQ2_XXS, F.IQ2_XS, F.IQ1_S, F.IQ1_M}
_GLM5_NEXT_Q8_PARTS = ("attn_q_a", "attn_q_b", "nextn.eh_proj")
_FLOAT_TYPES = (Q.F32, Q.BF16, Q.F16)
_ATTN_OUTPUT_8_EXPERTS = frozenset(
    {F.Q2_K, F.IQ3_XS, F.IQ3_XXS, F.Q3_K_S, F.Q3_K_M, F.IQ4_NL, F.Q4_K_S, F.Q4_K_M, F.IQ3_S, F.IQ3_M, F.IQ4_XS}
)
_NOT_FALCON = _not(_falcon)


def _glm5_next_projection(s: Situation) -> bool:
    return (
        s.model.architecture == "glm5-next"
        and any(part in s.name for part in _GLM5_NEXT_Q8_PARTS)
        and s.current_type not in _FLOAT_TYPES
    )


RULE_GROUPS: tuple[RuleGroup, ...] = (
    RuleGroup(
        "glm5-next projections",
        when=_glm5_next_projection,
        rules=(_rule(None, Q.Q8_0, why="glm5-next keeps these projections at Q8_0 or better"),),
    ),
    RuleGroup(
        "output",
        categories=frozenset({Category.OUTPUT}),
        rules=(
            _rule(None, _the_output_tensor_type, _output_type_given, "tied token_embd: --output-tensor-type"),
            _rule(F.MXFP4_MOE, Q.Q8_0, why="MXFP4_MOE output"),
            _rule(None, Q.Q8_0, _any(_falcon, _row_not_in_blocks), "falcon, or row not in whole blocks"),
            _rule({F.IQ2_XXS, F.IQ2_XS, F.IQ3_XXS, F.IQ1_S, F.IQ2_S, F.IQ2_M, F.IQ1_M}, Q.Q5_K),
            _rule(None, Q.Q6_K, _not(_type_is(Q.Q8_0))),
        ),
    ),
    RuleGroup(
        "MXFP4_MOE",
        ftypes=frozenset({F.MXFP4_MOE}),
        rules=(
            _rule(None, Q.MXFP4, _stacked_experts, "expert tensor"),
            _rule(None, Q.Q8_0, why="not an expert tensor"),
        ),
    ),
    RuleGroup(
        "token_embd",
        categories=frozenset({Category.TOKEN_EMBD}),
        rules=(
            _rule(_IQ1_IQ2_XXS_XS, Q.Q2_K),
            _rule({F.IQ2_S, F.IQ2_M, F.IQ3_XXS}, Q.IQ3_S),
            _rule({F.TQ1_0, F.TQ2_0, F.Q2_0}, Q.Q4_K),
        ),
    ),
    RuleGroup(
        "IQ1/IQ2 attn_v",
        categories=ATTN_V_LIKE,
        ftypes=IQ_LOW_FTYPES,
        counter="attn_v",
        rules=(
            _rule(None, Q.Q4_K, _any(_gqa_4, lambda s: s.model.n_expert >= 4), "GQA >= 4 or >= 4 experts"),
            _rule(_IQ2_S_M, Q.IQ3_S),
            _rule(_IQ1_IQ2_XXS_XS, Q.Q2_K),
        ),
    ),
    RuleGroup(
        "IQ1/IQ2 attn_k",
        categories=frozenset({Category.ATTN_K}),
        ftypes=IQ_LOW_FTYPES,
        rules=(_rule(None, Q.Q4_K, _experts_8, "8 experts"),),
    ),
    RuleGroup(
        "IQ1/IQ2 ffn_down",
        categories=frozenset({Category.FFN_DOWN}),
        ftypes=IQ_LOW_FTYPES,
        counter="ffn_down",  # the plain count, even in MoE models
        rules=(
            _rule(_IQ2_S_M, Q.IQ3_S, _first_eighth, "first eighth of ffn_down"),
            _rule(_IQ1_IQ2_XXS_XS, Q.Q2_K, _first_eighth, "first eighth of ffn_down"),
        ),
    ),
    RuleGroup(
        "IQ1/IQ2 attn_output",
        categories=frozenset({Category.ATTN_OUTPUT}),
        ftypes=IQ_LOW_FTYPES,
        rules=(
            _rule(None, Q.Q5_K, _experts_8, "8 experts"),
            _rule({F.IQ1_S, F.IQ1_M}, Q.IQ2_XXS),
            _rule(_IQ2_S_M, Q.IQ3_S),
        ),
    ),
    RuleGroup("IQ1/IQ2 other tensors", ftypes=IQ_LOW_FTYPES),
    RuleGroup(
        "attn_v",
        categories=ATTN_V_LIKE,
        counter="attn_v",
        rules=(
            _rule(F.Q2_K, Q.Q4_K, _gqa_4, "GQA >= 4"),
            _rule(F.Q2_K, Q.Q3_K),
            _rule(F.Q2_K_S, Q.Q4_K, _gqa_4, "GQA >= 4"),
            _rule(F.IQ3_XXS, Q.Q4_K, _gqa_4, "GQA >= 4"),
            _rule(F.IQ3_XXS, Q.IQ3_S, _not(_imatrix), "no imatrix"),
            _rule(F.IQ3_XXS, Q.IQ3_XXS),
            _rule({F.IQ3_XS, F.IQ3_S}, Q.Q4_K, _gqa_4, "GQA >= 4"),
            _rule(F.IQ3_M, Q.Q4_K),
            _rule(F.Q3_K_M, Q.Q5_K, _position_below(2), "first two attn_v"),
            _rule(F.Q3_K_M, Q.Q4_K),
            _rule(F.Q3_K_L, Q.Q5_K),
            _rule({F.IQ4_NL, F.IQ4_XS}, Q.Q5_K, _gqa_4, "GQA >= 4"),
            _rule({F.Q4_K_M, F.Q5_K_M}, Q.Q6_K, _more_bits, "use_more_bits layer"),
            _rule(F.Q4_K_S, Q.Q5_K, _position_below(4), "first four attn_v"),
        ),
        then=(
            # 70B: 8 heads share each attn_v, so it is 8x smaller than attn_q and cheap to bump.
            _rule(None, Q.Q5_K, _all(lambda s: s.model.is_70b, _type_is(Q.Q3_K, Q.Q4_K)), "70B model"),
            _rule(None, Q.Q8_0, _experts_8, "8 experts"),
        ),
    ),
    RuleGroup(
        "attn_k",
        categories=frozenset({Category.ATTN_K}),
        rules=(
            _rule(None, Q.Q8_0, _experts_8, "8 experts"),
            _rule(F.IQ3_XS, Q.IQ3_XXS),
            _rule(F.IQ3_XXS, Q.IQ2_S),
        ),
    ),
    RuleGroup(
        "attn_q",
        categories=frozenset({Category.ATTN_Q}),
        rules=(
            _rule(F.IQ3_XS, Q.IQ3_XXS),
            _rule(F.IQ3_XXS, Q.IQ2_S),
        ),
    ),
    RuleGroup(
        "ffn_down",
        categories=frozenset({Category.FFN_DOWN}),
        counter="ffn_down",
        layer_from_name=True,
        rules=(
            _rule(F.Q2_K, Q.Q3_K),
            _rule(F.Q2_K_S, Q.Q4_K, _first_eighth, "first eighth of layers"),
            _rule(F.IQ3_XXS, Q.Q4_K, _all(_not(_imatrix), _first_eighth), "no imatrix, first eighth"),
            _rule(F.IQ3_XXS, Q.Q3_K, _not(_imatrix), "no imatrix"),
            _rule(F.Q3_K_M, Q.Q5_K, _first_sixteenth, "first sixteenth of layers"),
            _rule(F.Q3_K_M, Q.Q4_K, _any(_NOT_FALCON, _more_bits), "use_more_bits layer or not falcon"),
            _rule(F.Q3_K_M, Q.Q3_K, why="falcon"),
            _rule(F.IQ3_M, Q.Q4_K, _any(_first_eighth, _all(_experts_8, _more_bits)), "first eighth"),
            _rule(F.Q3_K_L, Q.Q4_K, _falcon, "falcon"),
            _rule(F.Q3_K_L, Q.Q5_K),
            _rule(F.Q4_K_M, Q.Q6_K, _all(_falcon, _first_sixteenth), "falcon, first sixteenth"),
            _rule(F.Q4_K_M, Q.Q5_K, _all(_falcon, _more_bits), "falcon, use_more_bits layer"),
            _rule(F.Q4_K_M, Q.Q4_K, _falcon, "falcon"),
            _rule(F.Q4_K_M, Q.Q6_K, _more_bits, "use_more_bits layer"),
            _rule({F.IQ4_NL, F.IQ4_XS}, Q.Q5_K, _all(_first_eighth, _not(_imatrix)), "no imatrix, first eighth"),
            _rule(F.Q5_K_M, Q.Q6_K, _more_bits, "use_more_bits layer"),
            _rule(F.Q4_K_S, Q.Q5_K, _all(_NOT_FALCON, _first_eighth), "first eighth of layers"),
            # Guards the first layers against blow-ups seen even with an imatrix; only with one,
            # so that quantizing without an imatrix stays as it always was.
            _rule(F.Q4_0, Q.Q4_1, _all(_imatrix, _first_eighth), "imatrix, first eighth"),
            _rule(F.Q5_0, Q.Q5_1, _all(_imatrix, _first_eighth), "imatrix, first eighth"),
        ),
    ),
    RuleGroup(
        "attn_output",
        categories=frozenset({Category.ATTN_OUTPUT}),
        rules=(
            _rule(_ATTN_OUTPUT_8_EXPERTS, Q.Q5_K, _all(_NOT_FALCON, _experts_8), "8 experts"),
            _rule(F.Q2_K, Q.Q3_K, _all(_NOT_FALCON, _not(_experts_8))),
            _rule(F.IQ3_XXS, Q.IQ3_S, _all(_NOT_FALCON, _not(_experts_8))),
            _rule(F.Q3_K_M, Q.Q4_K, _all(_NOT_FALCON, _not(_experts_8))),
            _rule(F.Q3_K_L, Q.Q5_K, _all(_NOT_FALCON, _not(_experts_8))),
            _rule(F.IQ3_M, Q.Q4_K, _all(_NOT_FALCON, _not(_experts_8))),
            _rule(F.Q3_K_L, Q.Q4_K, _falcon, "falcon"),
        ),
    ),
    # llama.cpp also has an attn_qkv branch (Q4_K_M -> Q5_K, ...) but attn_qkv is attn_v-like
    # and caught by the attn_v group above, so that branch never runs; it is left out.
    RuleGroup(
        "ffn_gate",
        categories=frozenset({Category.FFN_GATE}),
        counter="ffn_gate",
        layer_from_name=True,
        rules=(_rule(F.IQ3_XS, Q.IQ3_XXS, _middle, "middle layers"),),
    ),
    RuleGroup(
        "ffn_up",
        categories=frozenset({Category.FFN_UP}),
        counter="ffn_up",
        layer_from_name=True,
        rules=(_rule(F.IQ3_XS, Q.IQ3_XXS, _middle, "middle layers"),),
    ),
)


_LEADING_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass
class RunningCounts:
    """llama.cpp's running counts (i_attention_wv, i_ffn_down…) and their totals."""

    totals: dict[str, int]
    seen: dict[str, int] = field(default_factory=dict)

    def position(self, group: RuleGroup, s: Situation) -> tuple[int, int]:
        """(position, n_positions) for a counted group, from the count or, in MoE models, the name."""
        assert group.counter is not None
        position, total = self.seen.get(group.counter, 0), self.totals[group.counter]
        if group.layer_from_name and s.model.n_expert > 1:
            match = _LEADING_LAYER.match(s.name)
            if match is None:
                raise BpwoptError(f"failed to determine the layer of tensor {s.name}")
            position = int(match.group(1))
            if position >= total:
                raise BpwoptError(f"bad layer {position} for tensor {s.name}; must be in [0, {total})")
        return position, total

    def count(self, group: RuleGroup) -> None:
        """One more tensor seen by a counted group."""
        if group.counter is not None:
            self.seen[group.counter] = self.seen.get(group.counter, 0) + 1


def apply_rules(s: Situation, counters: RunningCounts) -> tuple[GGMLQuantizationType, str]:
    """The preset's type for one tensor (llama_tensor_get_type_impl) and why, from RULE_GROUPS."""
    group = next((g for g in RULE_GROUPS if g.governs(s)), None)
    if group is None:
        return s.current_type, "preset"
    if group.counter is not None:
        position, n_positions = counters.position(group, s)
        s = replace(s, position=position, n_positions=n_positions)
    rule = next((r for r in group.rules if r.applies(s)), None)
    chosen, why = (rule.result(s), rule.explained(group)) if rule else (s.current_type, "preset")
    for later in group.then:
        if later.applies(replace(s, current_type=chosen)):
            chosen, why = later.result(s), later.explained(group)
    counters.count(group)
    return chosen, why


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorPlan:
    """The decision for one tensor."""

    source_name: str
    name: str  # as written: renumbered when --prune-layers removed earlier blocks
    shape: tuple[int, ...]  # ggml order, row length first
    category: Category
    source_type: GGMLQuantizationType
    target_type: GGMLQuantizationType
    quantizable: bool  # False: norms, 1-D tensors, routers… always keep their type
    pinned: bool  # the user fixed this tensor's type (--tensor-type, --ignore, output/embedding types)
    uses_imatrix: bool  # converted with an imatrix entry
    requires_imatrix: bool  # llama.cpp refuses to write this type without one
    reason: str  # why this type, for logs

    @property
    def converted(self) -> bool:
        """False when the source bytes are copied unchanged."""
        return self.source_type != self.target_type


@dataclass(frozen=True)
class TypePlan:
    """Target types for a whole model, in the order llama.cpp writes the tensors."""

    preset: Preset
    # non-layer tensors first, then by layer number, then by name; with keep_split in the input's order
    tensors: tuple[TensorPlan, ...]
    pruned: tuple[str, ...]  # source names removed by --prune-layers
    block_count: int | None  # new {arch}.block_count after pruning; None: unchanged
    file_type: int | None  # general.file_type to write; None: keep the input's (COPY)
    n_fallback: int  # tensors whose row length forced a fallback type
    has_imatrix: bool  # an imatrix with entries left after --include/--exclude-weights

    def types(self) -> dict[str, GGMLQuantizationType]:
        """Written tensor name -> target ggml type."""
        return {t.name: t.target_type for t in self.tensors}

    def categories(self) -> dict[str, Category]:
        """Written tensor name -> Category."""
        return {t.name: t.category for t in self.tensors}

    def kept_as_is(self) -> list[str]:
        """Tensors written with their source bytes (target type == source type)."""
        return [t.name for t in self.tensors if not t.converted]

    def not_quantizable(self) -> list[str]:
        """Tensors llama.cpp never quantizes (norms, 1-D, routers…), a subset of kept_as_is."""
        return [t.name for t in self.tensors if not t.quantizable]

    def unsupported_types(self) -> dict[str, GGMLQuantizationType]:
        """Converted tensors whose target type bpwopt has no kernel for yet."""
        return {t.name: t.target_type for t in self.tensors if t.converted and t.target_type not in QUANT_TYPES}


def llama_cpp_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's tensor order: tensors outside blk.N first, then by N, then by name.

    The running counts (and so the layer-position rules) follow this order, and
    llama.cpp writes the tensors in it.
    """

    def key(name: str) -> tuple[int, bytes]:
        match = _LEADING_LAYER.match(name)
        return (int(match.group(1)) if match else -1, name.encode())

    return sorted(names, key=key)


def renumber_layers(ordered_names: Sequence[str], prune_layers: Collection[int]) -> tuple[dict[str, str], int]:
    """Written names after --prune-layers, and the new block count (remap_layer).

    Pruned blocks map to nothing; blocks before the first pruned one keep their
    number; later blocks are renumbered consecutively in order. Names in the
    result are the survivors only.
    """
    prune = sorted(set(prune_layers))
    mapped: dict[int, int | None] = {}
    next_id = 0
    written: dict[str, str] = {}
    for name in ordered_names:
        match = re.search(r"blk\.(\d+)\.", name) if prune else None
        if match is None:
            written[name] = name
            continue
        block = int(match.group(1))
        if block not in mapped:
            if block in prune:
                mapped[block] = None
            elif block < prune[0]:
                mapped[block], next_id = block, block + 1
            else:
                mapped[block], next_id = next_id, next_id + 1
        if mapped[block] is not None:
            written[name] = f"{name[: match.start(1)]}{mapped[block]}{name[match.end(1) :]}"
    return written, next_id


def _requires_imatrix(name: str, target: GGMLQuantizationType, ftype: Ftype) -> bool:
    """llama.cpp refuses these very-low-bit types without an imatrix (tensor_requires_imatrix)."""
    if tensor_category(name) in (Category.TOKEN_EMBD, Category.OUTPUT):
        return False
    if target in (Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S):
        return True
    return target == Q.Q2_K and ftype == F.Q2_K_S


@dataclass
class _Run:
    """The state of one plan_types call, shared by the per-tensor steps."""

    preset: Preset
    model: ModelInfo
    options: QuantizeOptions
    overrides: list[tuple[re.Pattern[str], GGMLQuantizationType]]
    ignores: list[re.Pattern[str]]
    has_imatrix: bool
    tied_embeddings: bool
    counters: RunningCounts
    n_fallback: int = 0


def _target_type(run: _Run, spec: TensorSpec, name: str) -> tuple[GGMLQuantizationType, str, bool]:
    """llama_tensor_get_type for a quantizable tensor: options first, then the preset's rules.

    Returns the type, why, and whether a user option (not the preset) chose it.
    """
    options, category = run.options, tensor_category(name)
    if options.token_embedding_type is not None and category == Category.TOKEN_EMBD:
        # per_layer_token_embd is a big table of its own: a --tensor-type naming it wins
        named = name == "per_layer_token_embd.weight" and any(p.search(name) for p, _ in run.overrides)
        if not named:
            return options.token_embedding_type, "--token-embedding-type", True
    if options.output_tensor_type is not None and category == Category.OUTPUT:
        return options.output_tensor_type, "--output-tensor-type", True
    base_type = run.preset.base_type
    if not is_quantized(base_type):
        return base_type, "preset", False
    override = next(((p, t) for p, t in run.overrides if p.search(name)), None)
    pinned = override is not None
    if override is not None:
        chosen, why = override[1], f"--tensor-type {override[0].pattern}"
    elif options.pure:
        chosen, why = base_type, "--pure"
    else:
        situation = Situation(
            ftype=run.preset.ftype,
            category=Category.OUTPUT if category == Category.TOKEN_EMBD and run.tied_embeddings else category,
            name=name,
            row_length=spec.row_length,
            n_matrices=spec.shape[2] if len(spec.shape) > 2 else 1,
            model=run.model,
            has_imatrix=run.has_imatrix,
            current_type=base_type,
            output_tensor_type=options.output_tensor_type,
        )
        chosen, why = apply_rules(situation, run.counters)
    fitted = fallback_type(chosen, spec.row_length)
    if fitted != chosen:
        run.n_fallback += 1
        why += f"; row length {spec.row_length} not a multiple of {block_size(chosen)}: {chosen.name} -> {fitted.name}"
    return fitted, why, pinned


def compile_pattern(pattern: str, option: str) -> re.Pattern[str]:
    """A user's regex, or a BpwoptError naming the option it came from."""
    try:
        return re.compile(pattern)
    except re.error as error:
        raise BpwoptError(f"invalid {option} regex {pattern!r}: {error}") from None
    except (OverflowError, RecursionError) as error:  # a{99999999999}, or thousands of nested groups
        shown = pattern if len(pattern) <= 60 else pattern[:60] + "…"
        raise BpwoptError(f"invalid {option} regex {shown!r}: {error}") from None


def _compile_overrides(tensor_types: Sequence[tuple[str, GGMLQuantizationType]]):
    return [(compile_pattern(pattern, "--tensor-type"), ggml_type) for pattern, ggml_type in tensor_types]


def _compile_ignores(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    """--ignore REGEX; a leading `re:` is accepted (and dropped) for compatibility."""
    return [compile_pattern(p.removeprefix("re:"), "--ignore") for p in patterns]


def plan_types(
    tensors: Sequence[TensorSpec],
    model: ModelInfo,
    preset: Preset,
    options: QuantizeOptions | None = None,
    *,
    check_writable: bool = True,
) -> TypePlan:
    """The type llama-quantize would give every tensor for this preset and these options.

    tensors come in file order (a split model's shard by shard): the order
    options.keep_split plans and writes them in.
    With check_writable, raises BpwoptError where llama.cpp refuses to write the
    result: an already quantized tensor would be requantized without
    allow_requantize, or a type that needs an imatrix has none.
    """
    options = options or QuantizeOptions()
    specs = {spec.name: spec for spec in tensors}
    written, block_count = renumber_layers(llama_cpp_order(specs), options.prune_layers)
    imatrix_kept = (
        kept_imatrix_names(options.imatrix_names, options.include_weights, options.exclude_weights)
        if options.imatrix_names is not None
        else frozenset()
    )
    categories = [tensor_category(name) for name in written.values()]
    run = _Run(
        preset=preset,
        model=model,
        options=options,
        overrides=_compile_overrides(options.tensor_types),
        ignores=_compile_ignores(options.ignore),
        has_imatrix=bool(imatrix_kept),
        tied_embeddings=Category.OUTPUT not in categories,
        counters=RunningCounts(
            totals={
                "attn_v": sum(c in ATTN_V_LIKE for c in categories),
                "ffn_down": model.n_layer_all,
                "ffn_gate": model.n_layer_all,
                "ffn_up": model.n_layer_all,
            }
        ),
    )
    order = [source for source in specs if source in written] if options.keep_split else list(written)
    planned = tuple(_plan_tensor(run, specs[source], written[source], imatrix_kept) for source in order)
    plan = TypePlan(
        preset=preset,
        tensors=planned,
        pruned=tuple(name for name in llama_cpp_order(specs) if name not in written),
        block_count=block_count if options.prune_layers else None,
        file_type=None if preset.only_copy else int(preset.ftype),
        n_fallback=run.n_fallback,
        has_imatrix=run.has_imatrix,
    )
    if check_writable:
        check_plan_writable(plan, options)
    return plan


def preset_plans(
    tensors: Sequence[TensorSpec], model: ModelInfo, presets: Iterable[Preset], options: QuantizeOptions | None = None
) -> Iterator[tuple[Preset, TypePlan]]:
    """Each preset with the types llama-quantize would give this model, for comparing plans against.

    Presets llama.cpp cannot write for this model at all (Q1_0 on 576-wide
    rows has no fallback type) are left out rather than stopping the report.
    """
    for preset in presets:
        try:
            yield preset, plan_types(tensors, model, preset, options, check_writable=False)
        except BpwoptError:
            continue


def _plan_tensor(run: _Run, spec: TensorSpec, name: str, imatrix_kept: frozenset[str]) -> TensorPlan:
    quantizable = tensor_allows_quantization(
        name,
        spec.shape,
        run.model.architecture,
        leave_output_tensor=run.options.leave_output_tensor,
        only_copy=run.preset.only_copy,
    )
    pinned = False
    if quantizable and any(pattern.search(name) for pattern in run.ignores):
        target, reason, pinned = spec.source_type, "--ignore", True
    elif quantizable:
        target, reason, pinned = _target_type(run, spec, name)
    else:
        target, reason = spec.source_type, "COPY" if run.preset.only_copy else "never quantized"
    converted = target != spec.source_type
    return TensorPlan(
        source_name=spec.name,
        name=name,
        shape=spec.shape,
        category=tensor_category(name),
        source_type=spec.source_type,
        target_type=target,
        quantizable=quantizable,
        pinned=pinned,
        uses_imatrix=converted and spec.name in imatrix_kept,  # imatrix entries keep the source names
        requires_imatrix=quantizable and _requires_imatrix(name, target, run.preset.ftype),
        reason=reason,
    )


def check_plan_writable(plan: TypePlan, options: QuantizeOptions) -> None:
    """Raise BpwoptError where llama-quantize would refuse to write this plan."""
    needy = [t for t in plan.tensors if t.requires_imatrix]
    if needy and not plan.has_imatrix:
        first = needy[0]
        raise BpwoptError(
            f"this quantization requires an importance matrix (--imatrix): {len(needy)} tensors, "
            f"e.g. {first.name} -> {first.target_type.name}"
        )
    for t in plan.tensors:
        if t.converted and t.requires_imatrix and not t.uses_imatrix:
            raise BpwoptError(f"missing importance matrix for tensor {t.name} in a very low-bit quantization")
        if t.converted and is_quantized(t.source_type) and not options.allow_requantize:
            raise BpwoptError(
                f"requantizing from type {t.source_type.name} is disabled (tensor {t.source_name}); "
                "pass --allow-requantize"
            )
