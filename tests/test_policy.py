"""bpwopt.policy.presets and bpwopt.policy.llama, checked against llama.cpp's own quantizer.

The oracle is llama_model_quantize from llama-cpp-python: it writes a GGUF into
a temporary folder and gguf's reader reads the types back, in file order. The
inputs are the demo model (SmolLM2-135M, 576 wide, so most K-quants fall back)
and small synthetic GGUFs written here with real tensor names, real row lengths
and two rows per matrix: llama.cpp's quantizer reads only metadata and tensor
headers to decide types, so a 32-layer 4096-wide layout costs a few MiB.
Where writing is slow — the demo model's 18 cases (minutes on 2 cores), the
very-low-bit IQ presets (seconds of grid building each) — the oracle is
llama.cpp's --dry-run log instead, which prints the very types a real run
writes; its parser is itself checked against written files, on the demo too.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import llama_cpp
import llama_cpp._logger
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from bpwopt.errors import BpwoptError
from bpwopt.policy.llama import (
    Category,
    ModelInfo,
    QuantizeOptions,
    TensorSpec,
    TypePlan,
    fallback_type,
    kept_imatrix_names,
    llama_cpp_order,
    parse_tensor_type_option,
    plan_types,
    read_model_info,
    read_tensor_specs,
    renumber_layers,
    tensor_allows_quantization,
    tensor_category,
)
from bpwopt.policy.presets import (
    PRESETS,
    PRESETS_BY_NAME,
    Ftype,
    format_presets_help,
    parse_ggml_type_name,
    parse_type_argument,
)
from tests.conftest import llama_imatrix_table, save_gguf


@pytest.fixture(autouse=True, scope="module")
def quiet_llama_cpp():
    """llama.cpp logs a line per tensor; keep only its errors while this module runs."""
    level = llama_cpp._logger.logger.level
    llama_cpp._logger.set_verbose(False)
    yield
    llama_cpp._logger.logger.setLevel(level)


# ---------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One llama-quantize invocation: a preset and the flags that change types."""

    preset: str
    pure: bool = False
    leave_output_tensor: bool = False
    output_tensor_type: Q | None = None
    token_embedding_type: Q | None = None
    tensor_types: tuple[tuple[str, Q], ...] = ()
    prune_layers: tuple[int, ...] = ()
    imatrix: bool = False  # an imatrix entry (all ones) for every matrix
    exclude_weights: tuple[str, ...] = ()
    allow_requantize: bool = True

    def __str__(self) -> str:
        """A test id such as "Q4_K_M-pure" or "Q4_K_M-output=Q8_0"."""
        flags = {
            "pure": self.pure,
            "leave-output": self.leave_output_tensor,
            f"output={self.output_tensor_type and self.output_tensor_type.name}": self.output_tensor_type,
            f"embd={self.token_embedding_type and self.token_embedding_type.name}": self.token_embedding_type,
            "tt=" + ",".join(f"{p}={t.name}" for p, t in self.tensor_types): self.tensor_types,
            "prune=" + ",".join(map(str, self.prune_layers)): self.prune_layers,
            "imatrix": self.imatrix,
            "exclude=" + ",".join(self.exclude_weights): self.exclude_weights,
            "no-requantize": not self.allow_requantize,
        }
        return "-".join([self.preset] + [flag for flag, given in flags.items() if given])


@dataclass(frozen=True)
class Source:
    """An input GGUF, read once."""

    path: Path
    specs: list[TensorSpec]
    model: ModelInfo


def open_source(path: Path) -> Source:
    reader = GGUFReader(path)
    return Source(path, read_tensor_specs(reader), read_model_info(reader))


def imatrix_entries(source: Source, case: Case) -> dict[str, int]:
    """Entry name -> length (ne0 * experts) for every matrix, minus --exclude-weights (by substring)."""
    if not case.imatrix:
        return {}
    return {
        spec.name: spec.shape[0] * (spec.shape[2] if len(spec.shape) > 2 else 1)
        for spec in source.specs
        if len(spec.shape) >= 2 and not any(part in spec.name for part in case.exclude_weights)
    }


@dataclass
class LlamaCppRun:
    ok: bool
    types: list[tuple[str, Q]] = field(default_factory=list)  # file order
    block_count: int | None = None
    file_type: int | None = None


def run_llama_cpp(source: Source, output: Path, case: Case, *, dry_run: bool = False) -> LlamaCppRun:
    """Quantize with llama.cpp and read the written types back (dry_run: parse its log instead)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(PRESETS_BY_NAME[case.preset].ftype)
    params.nthread = 2
    params.allow_requantize = case.allow_requantize
    params.pure = case.pure
    params.quantize_output_tensor = not case.leave_output_tensor
    params.only_copy = PRESETS_BY_NAME[case.preset].only_copy
    params.dry_run = dry_run
    if case.output_tensor_type is not None:
        params.output_tensor_type = int(case.output_tensor_type)
    if case.token_embedding_type is not None:
        params.token_embedding_type = int(case.token_embedding_type)
    keep_alive = []  # ctypes arrays and buffers must outlive the call
    if case.tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(case.tensor_types) + 1))()
        for index, (pattern, ggml_type) in enumerate(case.tensor_types):
            overrides[index].pattern, overrides[index].type = pattern.encode(), int(ggml_type)
        params.tt_overrides = overrides
        keep_alive.append(overrides)
    if case.prune_layers:
        prune = (ctypes.c_int32 * (len(case.prune_layers) + 1))(*case.prune_layers, -1)
        params.prune_layers = prune
        keep_alive.append(prune)
    entries = imatrix_entries(source, case)
    if entries:
        ones = {name: np.ones(size, np.float32) for name, size in entries.items()}
        params.imatrix, arrays = llama_imatrix_table(ones)
        keep_alive.extend(arrays)
    if dry_run:
        return _dry_run(source, params)
    ok = llama_cpp.llama_model_quantize(bytes(source.path), bytes(output), ctypes.byref(params)) == 0
    if not ok:
        return LlamaCppRun(ok=False)
    reader = GGUFReader(output)
    arch = reader.fields["general.architecture"].contents()
    return LlamaCppRun(
        ok=True,
        types=[(t.name, Q(t.tensor_type)) for t in reader.tensors],
        block_count=reader.fields[f"{arch}.block_count"].contents(),
        file_type=reader.fields["general.file_type"].contents(),
    )


# "[  12/ 259] blk.0.attn_v.weight   - [ 4096,  2,  1,  1], type =    f16, size = 0.02 MiB -> 0.01 MiB (q6_K)"
_DRY_RUN_LINE = re.compile(
    r"\[\s*\d+/\s*\d+\] (\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\w+)\))?"
)


def _dry_run(source: Source, params) -> LlamaCppRun:
    pieces = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        pieces.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        ok = llama_cpp.llama_model_quantize(bytes(source.path), b"unused.gguf", ctypes.byref(params)) == 0
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    found = _DRY_RUN_LINE.findall("".join(pieces))
    return LlamaCppRun(ok=ok, types=[(name, Q[(new or old).upper()]) for name, old, new in found])


def bpwopt_plan(source: Source, case: Case, *, check_writable: bool = True) -> TypePlan:
    entries = imatrix_entries(source, case)
    options = QuantizeOptions(
        pure=case.pure,
        leave_output_tensor=case.leave_output_tensor,
        output_tensor_type=case.output_tensor_type,
        token_embedding_type=case.token_embedding_type,
        tensor_types=case.tensor_types,
        allow_requantize=case.allow_requantize,
        prune_layers=case.prune_layers,
        imatrix_names=frozenset(entries) if case.imatrix else None,
    )
    return plan_types(
        source.specs,
        source.model,
        PRESETS_BY_NAME[case.preset],
        options,
        check_writable=check_writable,
    )


def assert_same_types(plan: TypePlan, run: LlamaCppRun) -> None:
    """Every tensor, in llama.cpp's order, has llama.cpp's type."""
    assert run.ok, "llama.cpp refused this case"
    ours = [(t.name, t.target_type) for t in plan.tensors]
    differing = [
        f"{name}: bpwopt {mine.name}, llama.cpp {theirs.name}"
        for (name, mine), (_, theirs) in zip(ours, run.types, strict=False)
        if mine != theirs
    ]
    assert not differing, f"{len(differing)}/{len(ours)} differ: " + "; ".join(differing[:8])
    assert [name for name, _ in ours] == [name for name, _ in run.types]


def compare(source: Source, output: Path, case: Case) -> TypePlan:
    """Run both, expecting both to succeed with the same types; returns bpwopt's plan."""
    run = run_llama_cpp(source, output, case)
    plan = bpwopt_plan(source, case)
    assert_same_types(plan, run)
    if run.file_type is not None and plan.file_type is not None:
        assert plan.file_type == run.file_type
    return plan


# ---------------------------------------------------------------------------
# The demo model: the presets the brief names, and the output / embedding flags
# ---------------------------------------------------------------------------

DEMO_PRESETS = (
    "Q4_0", "Q5_1", "Q8_0", "Q3_K_M", "Q4_K_M", "Q6_K", "IQ4_XS",
    "Q2_K", "Q3_K_S", "Q3_K_L", "Q4_K_S", "Q5_K_S", "Q5_K_M", "IQ4_NL",
)  # fmt: skip
DEMO_CASES = [Case(name) for name in DEMO_PRESETS] + [
    Case("Q4_K_M", pure=True),
    Case("Q4_K_M", leave_output_tensor=True),
    Case("Q4_K_M", output_tensor_type=Q.Q8_0),
    Case("Q4_K_M", token_embedding_type=Q.Q4_0),
]


@pytest.fixture(scope="module")
def demo(demo_model_path) -> Source:
    return open_source(demo_model_path)


# Writing all of these takes minutes on 2 cores (IQ4_NL alone about 30 s), so by default llama.cpp runs
# them as --dry-run, which decides every type exactly as a real run does (both print the same
# tensor_metadata.target_type) and only skips the quantizing. BPWOPT_DEMO_ORACLE=write writes them all.
DEMO_ORACLE_WRITES = os.environ.get("BPWOPT_DEMO_ORACLE") == "write"


@pytest.fixture(scope="module", params=DEMO_CASES, ids=str)
def demo_run(request, demo, tmp_path_factory):
    """llama.cpp's result for one demo case, computed once."""
    output = tmp_path_factory.mktemp("demo") / "out.gguf"
    return request.param, run_llama_cpp(demo, output, request.param, dry_run=not DEMO_ORACLE_WRITES)


def test_demo_model_types_match_llama_cpp(demo_run, demo):
    case, run = demo_run
    plan = bpwopt_plan(demo, case)
    assert len(plan.tensors) == len(run.types) == 272
    assert_same_types(plan, run)
    if DEMO_ORACLE_WRITES:
        assert plan.file_type == run.file_type == int(PRESETS_BY_NAME[case.preset].ftype)


@pytest.mark.slow  # writes the demo model
@pytest.mark.parametrize("case", [Case("Q4_K_M"), Case("Q8_0")], ids=str)
def test_demo_written_file_matches_dry_run_and_policy(demo, tmp_path, case):
    written = run_llama_cpp(demo, tmp_path / "out.gguf", case)
    assert run_llama_cpp(demo, tmp_path / "unused.gguf", case, dry_run=True).types == written.types
    plan = bpwopt_plan(demo, case)
    assert_same_types(plan, written)
    assert plan.file_type == written.file_type == int(PRESETS_BY_NAME[case.preset].ftype)


def test_demo_q4_k_m_falls_back_for_the_576_wide_tensors(demo):
    plan = bpwopt_plan(demo, Case("Q4_K_M"))
    assert plan.n_fallback == 180
    types = plan.types()
    assert types["blk.0.attn_q.weight"] == Q.Q5_0  # Q4_K needs rows of 256; 576 is not
    assert types["blk.0.ffn_down.weight"] == Q.Q6_K  # 1536-long rows fit, first eighth: use_more_bits
    assert types["blk.4.ffn_down.weight"] == Q.Q4_K
    assert types["token_embd.weight"] == Q.Q8_0  # tied output: Q6_K wanted, 576 falls back to Q8_0
    assert plan.categories()["blk.0.attn_v.weight"] == Category.ATTN_V
    assert len(plan.not_quantizable()) == 61  # the norms


def test_demo_requantize_is_refused_like_llama_cpp(demo, tmp_path):
    case = Case("Q8_0", allow_requantize=False)
    assert not run_llama_cpp(demo, tmp_path / "out.gguf", case).ok
    with pytest.raises(BpwoptError, match="requantizing from type Q4_1 is disabled"):
        bpwopt_plan(demo, case)


@pytest.mark.slow  # writes the demo model
def test_demo_q4_1_without_requantize_only_copies(demo, tmp_path):
    # Every target equals the source type (token_embd: Q6_K falls back to Q8_0, its type), so nothing
    # is requantized and llama.cpp accepts it without --allow-requantize.
    plan = compare(demo, tmp_path / "out.gguf", Case("Q4_1", allow_requantize=False))
    assert plan.kept_as_is() == [t.name for t in plan.tensors]


# ---------------------------------------------------------------------------
# Synthetic layouts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    architecture: str
    metadata: dict[str, int | float]  # keys without the "{arch}." prefix
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # name, ggml shape (ne0 first)


def llama_layout(
    *,
    n_layer: int,
    n_embd: int,
    n_ff: int,
    n_head: int,
    n_head_kv: int,
    n_expert: int = 0,
    tied: bool = False,
    shared_experts: bool = False,
    extras: tuple[tuple[str, tuple[int, ...]], ...] = (),
) -> Layout:
    """A llama-architecture model: real names and row lengths, two rows per matrix."""
    tensors = [("token_embd.weight", (n_embd, 4)), ("output_norm.weight", (n_embd,))]
    tensors += [] if tied else [("output.weight", (n_embd, 4))]
    for i in range(n_layer):
        block = f"blk.{i}."
        tensors += [(block + "attn_norm.weight", (n_embd,)), (block + "ffn_norm.weight", (n_embd,))]
        tensors += [(block + f"attn_{part}.weight", (n_embd, 2)) for part in ("q", "k", "v", "output")]
        if n_expert:
            tensors += [(block + "ffn_gate_inp.weight", (n_embd, n_expert))]
            tensors += [(block + f"ffn_{part}_exps.weight", (n_embd, 2, n_expert)) for part in ("gate", "up")]
            tensors += [(block + "ffn_down_exps.weight", (n_ff, 2, n_expert))]
        if shared_experts or not n_expert:
            suffix = "_shexp" if n_expert else ""
            tensors += [(block + f"ffn_{part}{suffix}.weight", (n_embd, 2)) for part in ("gate", "up")]
            tensors += [(block + f"ffn_down{suffix}.weight", (n_ff, 2))]
    metadata = {
        "block_count": n_layer,
        "context_length": 4096,
        "embedding_length": n_embd,
        "feed_forward_length": n_ff,
        "attention.head_count": n_head,
        "attention.head_count_kv": n_head_kv,
        "attention.layer_norm_rms_epsilon": 1e-5,
    }
    if n_expert:
        metadata |= {"expert_count": n_expert, "expert_used_count": 2}
    return Layout("llama", metadata, tuple(tensors) + extras)


def falcon_layout(n_layer: int = 32, n_embd: int = 4544, n_ff: int = 18176) -> Layout:
    """Falcon-7B: fused attn_qkv, 4544-wide rows (not a multiple of 256), untied output."""
    tensors = [("token_embd.weight", (n_embd, 4)), ("output_norm.weight", (n_embd,))]
    tensors += [("output_norm.bias", (n_embd,)), ("output.weight", (n_embd, 4))]
    for i in range(n_layer):
        block = f"blk.{i}."
        tensors += [(block + "attn_norm.weight", (n_embd,)), (block + "attn_norm.bias", (n_embd,))]
        tensors += [(block + name, (n_embd, 2)) for name in ("attn_qkv.weight", "attn_output.weight")]
        tensors += [(block + "ffn_up.weight", (n_embd, 2)), (block + "ffn_down.weight", (n_ff, 2))]
    metadata = {
        "block_count": n_layer,
        "context_length": 2048,
        "embedding_length": n_embd,
        "feed_forward_length": n_ff,
        "attention.head_count": 71,
        "attention.head_count_kv": 1,
        "attention.layer_norm_epsilon": 1e-5,
    }
    return Layout("falcon", metadata, tuple(tensors))


# odd-tied: rows of 4160 and 11200 (multiples of 32, not of 256), one 4100-long row (not even of 32)
# and no output.weight, so token_embd doubles as the output.
# moe-shared: 4 experts with shared experts, attn_kv_b beside attn_v (two attn_v-like tensors per layer,
# one running count), and tensors llama.cpp never quantizes.
LAYOUTS = {
    "llama-8b": llama_layout(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8),
    "llama-7b-mha": llama_layout(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32),
    "llama-70b": llama_layout(n_layer=80, n_embd=1024, n_ff=2816, n_head=64, n_head_kv=8),
    "mixtral": llama_layout(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_expert=8),
    "falcon-7b": falcon_layout(),
    "odd-tied": llama_layout(
        n_layer=16,
        n_embd=4160,
        n_ff=11200,
        n_head=32,
        n_head_kv=8,
        tied=True,
        extras=(("blk.7.attn_q_extra.weight", (4100, 2)),),
    ),
    "moe-shared": llama_layout(
        n_layer=24,
        n_embd=2048,
        n_ff=1408,
        n_head=16,
        n_head_kv=16,
        n_expert=4,
        shared_experts=True,
        extras=tuple((f"blk.{i}.attn_kv_b.weight", (512, 2)) for i in range(24))
        + tuple((f"blk.{i}.ssm_conv1d.weight", (4, 64)) for i in range(3))
        + (
            ("per_layer_token_embd.weight", (2048, 4)),
            ("position_embd.weight", (2048, 4)),
            ("rope_freqs.weight", (64,)),
            ("blk.0.attn_q.bias", (2048,)),
            ("blk.0.attn_out_scale.weight", (2048, 1)),  # 1-D for ggml: trailing 1s do not count
        ),
    ),
}


def write_layout(layout: Layout, path: Path) -> Path:
    """A GGUF llama.cpp can load metadata from: the layout's tensors, all zeros (matrices in F16)."""
    writer = gguf.GGUFWriter(path, layout.architecture)
    for key, value in layout.metadata.items():
        full_key = f"{layout.architecture}.{key}"
        if isinstance(value, float):
            writer.add_float32(full_key, value)
        else:
            writer.add_uint32(full_key, value)
    for name, shape in layout.tensors:
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor(name, np.zeros(tuple(reversed(shape)), dtype))
    save_gguf(writer)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Layout name -> its GGUF, written and read on first use."""
    folder = tmp_path_factory.mktemp("synthetic")
    written: dict[str, Source] = {}

    def source_of(name: str) -> Source:
        if name not in written:
            written[name] = open_source(write_layout(LAYOUTS[name], folder / f"{name}.gguf"))
        return written[name]

    return source_of


# Presets whose file llama.cpp writes in a blink. The IQ1/IQ2/IQ3 ones need grids first (seconds
# each) and are compared through the dry-run log below. The aliases (Q3_K, Q4_K, Q5_K) select the same
# ftypes as Q3_K_M, Q4_K_M, Q5_K_M.
FAST_PRESETS = (
    "Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "Q2_K", "Q3_K_S",
    "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "Q8_0", "F16", "BF16", "F32",
)  # fmt: skip
# An imatrix changes these presets' rules (Q2_K_S cannot do without one).
IMATRIX_PRESETS = ("Q2_K_S", "Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS")
GRID_PRESETS = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M")
SWEEP_LAYOUTS = ("llama-8b", "llama-7b-mha", "mixtral", "falcon-7b", "odd-tied", "moe-shared")
# Q1_0 has 128-element blocks and no fallback: llama.cpp stops on rows of 4544 or 4160.
REFUSED = {("falcon-7b", "Q1_0"), ("odd-tied", "Q1_0")}

FULL_SWEEP_LAYOUTS = ("llama-8b", "mixtral", "falcon-7b", "odd-tied", "moe-shared")
SWEEP = [(layout, Case(name)) for layout in FULL_SWEEP_LAYOUTS for name in FAST_PRESETS]
SWEEP += [(layout, Case(name, imatrix=True)) for layout in FULL_SWEEP_LAYOUTS for name in IMATRIX_PRESETS]
# Without GQA (and in a 70B model) only a few presets decide differently.
SWEEP += [("llama-7b-mha", Case(name)) for name in ("Q2_K", "Q3_K_M", "Q4_K_M", "IQ4_NL", "IQ4_XS")]
SWEEP += [("llama-7b-mha", Case("Q2_K_S", imatrix=True))]
SWEEP += [("llama-70b", Case(name)) for name in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q4_K_S")]


@pytest.mark.parametrize(("layout", "case"), SWEEP, ids=[f"{layout}-{case}" for layout, case in SWEEP])
def test_synthetic_preset_types_match_llama_cpp(synthetic, tmp_path, layout, case):
    source = synthetic(layout)
    if (layout, case.preset) in REFUSED:
        assert not run_llama_cpp(source, tmp_path / "out.gguf", case).ok
        with pytest.raises(BpwoptError, match="no tensor type fallback"):
            bpwopt_plan(source, case)
        return
    compare(source, tmp_path / "out.gguf", case)


OPTION_CASES = [
    ("llama-8b", Case("Q4_K_M", pure=True)),
    ("odd-tied", Case("Q4_K_M", pure=True)),
    ("llama-8b", Case("Q4_K_M", leave_output_tensor=True)),
    ("llama-8b", Case("Q3_K_M", output_tensor_type=Q.Q8_0)),
    ("odd-tied", Case("Q3_K_M", output_tensor_type=Q.Q8_0)),  # tied: token_embd follows it
    ("llama-8b", Case("Q4_K_M", token_embedding_type=Q.Q4_0)),
    ("odd-tied", Case("Q5_K_M", token_embedding_type=Q.Q4_0, output_tensor_type=Q.Q8_0)),
    ("llama-8b", Case("F16", token_embedding_type=Q.Q8_0, output_tensor_type=Q.Q6_K)),
    # Overriding the first four attn_v shifts llama.cpp's running attn_v count for the rest.
    ("llama-8b", Case("Q4_K_M", tensor_types=((r"blk\.[0-3]\.attn_v", Q.Q8_0), ("ffn_up", Q.F16)))),
    ("llama-8b", Case("Q3_K_M", tensor_types=((r"blk\.1\d\.ffn_down", Q.Q5_K), ("output", Q.Q4_K)))),
    ("odd-tied", Case("Q8_0", tensor_types=(("attn_q", Q.Q4_K), ("token_embd", Q.Q6_K)))),  # -> fallbacks
    ("moe-shared", Case("Q4_K_M", token_embedding_type=Q.Q4_0, tensor_types=(("per_layer", Q.Q8_0),))),
    ("moe-shared", Case("Q4_K_M", token_embedding_type=Q.Q4_0)),
    ("llama-8b", Case("Q4_K_M", prune_layers=(3, 10, 31))),
    ("mixtral", Case("Q3_K_M", prune_layers=(0,))),
    ("llama-8b", Case("IQ4_XS", imatrix=True, exclude_weights=("ffn_down",))),
    ("llama-8b", Case("IQ4_XS", imatrix=True, exclude_weights=("blk", "embd", "output"))),  # none left
    ("llama-8b", Case("COPY")),
]


@pytest.mark.parametrize(("layout", "case"), OPTION_CASES, ids=[f"{lay}-{case}" for lay, case in OPTION_CASES])
def test_synthetic_option_types_match_llama_cpp(synthetic, tmp_path, layout, case):
    source = synthetic(layout)
    run = run_llama_cpp(source, tmp_path / "out.gguf", case)
    plan = bpwopt_plan(source, case)
    assert_same_types(plan, run)
    if case.prune_layers:
        assert plan.block_count == run.block_count
        assert len(plan.pruned) > 0


GRID_CASES = [(layout, Case(name, imatrix=True)) for layout in SWEEP_LAYOUTS for name in GRID_PRESETS]
GRID_CASES += [("llama-8b", Case("IQ3_XXS")), ("llama-70b", Case("IQ3_XS")), ("llama-70b", Case("IQ2_M"))]


@pytest.mark.parametrize(("layout", "case"), GRID_CASES, ids=[f"{lay}-{case}" for lay, case in GRID_CASES])
def test_synthetic_iq_grid_presets_match_llama_cpp_dry_run(synthetic, layout, case):
    source = synthetic(layout)
    run = run_llama_cpp(source, Path("unused"), case, dry_run=True)
    assert_same_types(bpwopt_plan(source, case, check_writable=False), run)


@pytest.mark.parametrize("case", [Case("Q4_K_M"), Case("Q3_K_M", imatrix=True)], ids=str)
def test_dry_run_log_parser_agrees_with_written_file(synthetic, tmp_path, case):
    source = synthetic("llama-8b")
    written = run_llama_cpp(source, tmp_path / "out.gguf", case)
    logged = run_llama_cpp(source, tmp_path / "unused.gguf", case, dry_run=True)
    assert logged.types == written.types
    assert len(logged.types) == len(LAYOUTS["llama-8b"].tensors)


@pytest.mark.parametrize("preset", ["Q2_K_S", "IQ2_XXS"])
def test_missing_imatrix_is_refused_like_llama_cpp(synthetic, tmp_path, preset):
    source = synthetic("llama-8b")
    assert not run_llama_cpp(source, tmp_path / "out.gguf", Case(preset)).ok
    with pytest.raises(BpwoptError, match="requires an importance matrix"):
        bpwopt_plan(source, Case(preset))


# ---------------------------------------------------------------------------
# The tables, read directly
# ---------------------------------------------------------------------------


def test_q4_k_m_layer_position_rules_on_a_32_layer_llama(synthetic):
    types = bpwopt_plan(synthetic("llama-8b"), Case("Q4_K_M")).types()
    bumped = [i for i in range(32) if types[f"blk.{i}.attn_v.weight"] == Q.Q6_K]
    # use_more_bits: first and last eighth, and every third layer in between
    assert bumped == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if types[f"blk.{i}.ffn_down.weight"] == Q.Q6_K] == bumped
    assert types["output.weight"] == Q.Q6_K
    assert types["token_embd.weight"] == Q.Q4_K
    assert types["blk.5.attn_q.weight"] == Q.Q4_K


def test_q3_k_m_bumps_and_70b_rule(synthetic):
    small = bpwopt_plan(synthetic("llama-8b"), Case("Q3_K_M")).types()
    assert [small[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert [small[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2)] == [Q.Q5_K, Q.Q5_K, Q.Q4_K]
    assert small["blk.9.attn_output.weight"] == Q.Q4_K
    big = bpwopt_plan(synthetic("llama-70b"), Case("Q3_K_M")).types()
    assert big["blk.40.attn_v.weight"] == Q.Q5_K  # Q4_K raised to Q5_K in a 70B model


def test_eight_expert_rules(synthetic):
    types = bpwopt_plan(synthetic("mixtral"), Case("Q4_K_S")).types()
    assert types["blk.3.attn_v.weight"] == Q.Q8_0
    assert types["blk.3.attn_k.weight"] == Q.Q8_0
    assert types["blk.3.attn_output.weight"] == Q.Q5_K
    assert types["blk.3.ffn_down_exps.weight"] == Q.Q5_K  # layer 3 of 32: first eighth
    assert types["blk.4.ffn_down_exps.weight"] == Q.Q4_K
    assert types["blk.4.ffn_gate_inp.weight"] == Q.F16  # router: never quantized


def test_glm5_next_projection_rule_reads_as_in_llama_quant_cpp():
    # No loadable glm5-next GGUF can be built here, so this checks the table against the C++ by reading.
    model = ModelInfo("glm5-next", n_layer_all=4, n_head=8, n_head_kv=8)
    specs = [
        TensorSpec("blk.0.attn_q_a.weight", (256, 2), Q.F16),
        TensorSpec("blk.0.attn_k_b.weight", (256, 2), Q.F16),
        TensorSpec("blk.0.attn_v.weight", (256, 2), Q.F16),
    ]
    types = plan_types(specs, model, PRESETS_BY_NAME["Q4_K_M"]).types()
    assert types == {
        "blk.0.attn_q_a.weight": Q.Q8_0,
        "blk.0.attn_k_b.weight": Q.F16,
        "blk.0.attn_v.weight": Q.Q6_K,
    }


@pytest.mark.parametrize(
    ("target", "row_length", "expected"),
    [
        (Q.Q4_K, 576, Q.Q5_0),
        (Q.Q5_K, 576, Q.Q5_1),
        (Q.Q6_K, 576, Q.Q8_0),
        (Q.Q2_K, 576, Q.Q4_0),
        (Q.Q3_K, 576, Q.Q4_0),
        (Q.IQ4_XS, 576, Q.IQ4_NL),
        (Q.IQ2_XXS, 576, Q.IQ4_NL),
        (Q.Q4_K, 1536, Q.Q4_K),
        (Q.Q4_K, 100, Q.F16),
        (Q.Q8_0, 100, Q.F16),
        (Q.F32, 100, Q.F32),
    ],
)
def test_fallback_chain(target, row_length, expected):
    assert fallback_type(target, row_length) == expected


def test_no_fallback_for_other_256_block_types():
    with pytest.raises(BpwoptError, match="no tensor type fallback is defined for type Q8_K"):
        fallback_type(Q.Q8_K, 576)


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("token_embd.weight", Category.TOKEN_EMBD),
        ("per_layer_token_embd.weight", Category.TOKEN_EMBD),
        ("output.weight", Category.OUTPUT),
        ("blk.0.attn_q.weight", Category.ATTN_Q),
        ("blk.0.attn_k.weight", Category.ATTN_K),
        ("blk.0.attn_v.weight", Category.ATTN_V),
        ("blk.0.attn_qkv.weight", Category.ATTN_QKV),
        ("blk.0.attn_kv_b.weight", Category.ATTN_KV_B),
        ("blk.0.attn_output.weight", Category.ATTN_OUTPUT),
        ("blk.0.ffn_gate_exps.weight", Category.FFN_GATE),
        ("blk.0.ffn_up_shexp.weight", Category.FFN_UP),
        ("blk.0.ffn_down.weight", Category.FFN_DOWN),
        ("blk.0.attn_norm.weight", Category.OTHER),
        ("output_norm.weight", Category.OTHER),
    ],
)
def test_categories(name, category):
    assert tensor_category(name) is category


def test_which_tensors_may_be_quantized():
    assert tensor_allows_quantization("blk.0.attn_q.weight", (4096, 4096), "llama")
    assert tensor_allows_quantization("blk.0.ffn_down_exps.weight", (14336, 4096, 8), "llama")
    assert not tensor_allows_quantization("blk.0.attn_q.weight", (4096, 4096), "llama", only_copy=True)
    assert not tensor_allows_quantization("blk.0.attn_norm.weight", (4096,), "llama")
    assert not tensor_allows_quantization("blk.0.attn_q.weight", (4096, 1), "llama")  # 1-D for ggml
    assert not tensor_allows_quantization("blk.0.attn_q.bias", (4096, 2), "llama")
    assert not tensor_allows_quantization("blk.0.ffn_gate_inp.weight", (4096, 8), "llama")
    assert not tensor_allows_quantization("position_embd.weight", (768, 512), "bert")
    assert not tensor_allows_quantization("output.weight", (4096, 32000), "llama", leave_output_tensor=True)
    assert tensor_allows_quantization("blk.0.hc_proj.weight", (256, 256), "llama")
    assert not tensor_allows_quantization("blk.0.hc_proj.weight", (256, 256), "glm5-next")


def test_llama_cpp_order_and_layer_renumbering():
    names = ["blk.10.attn_q.weight", "blk.2.ffn_up.weight", "output.weight", "blk.2.attn_k.weight", "a.weight"]
    ordered = llama_cpp_order(names)
    assert ordered == [
        "a.weight", "output.weight", "blk.2.attn_k.weight", "blk.2.ffn_up.weight", "blk.10.attn_q.weight",
    ]  # fmt: skip
    layers = [f"blk.{i}.attn_q.weight" for i in range(6)]
    written, block_count = renumber_layers(layers, [1, 3])
    assert written == {
        "blk.0.attn_q.weight": "blk.0.attn_q.weight",
        "blk.2.attn_q.weight": "blk.1.attn_q.weight",
        "blk.4.attn_q.weight": "blk.2.attn_q.weight",
        "blk.5.attn_q.weight": "blk.3.attn_q.weight",
    }
    assert block_count == 4


def test_imatrix_include_and_exclude():
    names = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert kept_imatrix_names(names, exclude=["ffn_down"]) == {"blk.0.attn_q.weight"}
    assert kept_imatrix_names(names, include=["blk.1"]) == {"blk.1.ffn_down.weight"}
    with pytest.raises(BpwoptError, match="cannot be used together"):
        kept_imatrix_names(names, include=["a"], exclude=["b"])


def test_tensor_type_option_parsing():
    assert parse_tensor_type_option("ATTN_Q=q8_0") == ("attn_q", Q.Q8_0)
    with pytest.raises(BpwoptError, match="REGEX=TYPE"):
        parse_tensor_type_option("attn_q")
    with pytest.raises(BpwoptError, match="invalid ggml type 'q9_9'"):
        parse_tensor_type_option("attn_q=q9_9")


def test_invalid_override_regex_is_a_user_error(synthetic):
    with pytest.raises(BpwoptError, match="invalid --tensor-type regex"):
        bpwopt_plan(synthetic("llama-8b"), Case("Q4_K_M", tensor_types=(("attn_(q", Q.Q8_0),)))


# ---------------------------------------------------------------------------
# Presets and the TYPE argument
# ---------------------------------------------------------------------------


def test_preset_ids_match_gguf_file_types():
    # gguf's LlamaFileType is an independent copy of llama.h's enum (it lacks Q2_0).
    for preset in PRESETS:
        if preset.ftype != Ftype.Q2_0:
            assert gguf.LlamaFileType[f"MOSTLY_{preset.ftype.name}" if preset.ftype else "ALL_F32"] == preset.ftype


@pytest.mark.parametrize(
    ("text", "is_clip", "preset", "reading"),
    [
        ("q4_k_m", False, "Q4_K_M", "preset name"),
        (" Q8_0 ", True, "Q8_0", "preset name"),
        ("copy", False, "COPY", "preset name"),
        ("7", False, "Q8_0", "llama ftype id"),
        ("8", False, "Q5_0", "llama ftype id"),
        ("12", False, "Q3_K", "llama ftype id"),  # the alias comes first in llama-quantize's table
        ("0", False, "F32", "llama ftype id"),  # not COPY
        ("2", True, "Q4_0", "ggml type id (CLIP file)"),
        ("3", True, "Q4_1", "ggml type id (CLIP file)"),
        ("6", True, "Q5_0", "ggml type id (CLIP file)"),
        ("7", True, "Q5_1", "ggml type id (CLIP file)"),
        ("8", True, "Q8_0", "ggml type id (CLIP file)"),
        ("mxfp4", False, "MXFP4_MOE", "ggml type name"),
    ],
)
def test_type_argument(text, is_clip, preset, reading):
    choice = parse_type_argument(text, is_clip)
    assert (choice.preset.name, choice.reading) == (preset, reading)


def test_type_argument_log_line():
    assert parse_type_argument("7", False).describe() == "TYPE '7' read as a llama ftype id: Q8_0 (llama ftype 7)"
    assert parse_type_argument("7", True).describe() == (
        "TYPE '7' read as a ggml type id (CLIP file): Q5_1 (ggml type 7)"
    )
    assert parse_type_argument("12", False).preset.ftype == Ftype.Q3_K_M


@pytest.mark.parametrize(("text", "is_clip"), [("Q9_K", False), ("99", False), ("4", True), ("10", True)])
def test_unknown_type_argument_lists_the_choices(text, is_clip):
    with pytest.raises(BpwoptError) as error:
        parse_type_argument(text, is_clip)
    message = str(error.value)
    assert "\n" not in message
    assert f"{text!r}" in message
    assert ("2=Q4_0, 3=Q4_1, 6=Q5_0, 7=Q5_1, 8=Q8_0" in message) == is_clip
    assert "Q4_K_M" in message


def test_ggml_type_names_are_case_insensitive():
    assert parse_ggml_type_name("q6_k") == Q.Q6_K
    assert parse_ggml_type_name("Bf16") == Q.BF16


def test_help_listing_matches_llama_quantize():
    lines = format_presets_help().splitlines()
    assert lines[2] == "   2  or  Q4_0    :  4.34G, +0.4685 ppl @ Llama-3-8B"
    assert lines[-1] == "          COPY    : only copy tensors, no quantizing"
    assert lines[1] == "  41  or  Q2_0    :  2.25 bpw quantization (group 64)"
    assert len(lines) == len(PRESETS) == 39
