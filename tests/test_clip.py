"""CLIP / mmproj files: `bpwopt mmproj-f16.gguf OUT 7` writes what clip-quantize-cli wrote.

No package ships an mmproj file, so the test builds one: a LLaVA-1.5-style
projector with the tensor names, layouts and metadata keys of llama.cpp's
clip.cpp and its converter, in small dimensions.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import bpwopt
from bpwopt.cli.main import main
from bpwopt.policy.clip import plan_clip_types
from bpwopt.policy.llama import QuantizeOptions, TensorSpec
from bpwopt.policy.presets import PRESETS_BY_NAME
from bpwopt.quant.reference import ggml_quantize
from bpwopt.source.rows import tensor_rows
from tests.conftest import save_gguf

N_EMBD, N_FF, N_PROJ, N_BLOCK, PATCH, IMAGE = 64, 128, 96, 2, 4, 8
N_POSITIONS = (IMAGE // PATCH) ** 2 + 1  # patches plus the class embedding

CLIP_TYPE_IDS = {2: Q.Q4_0, 3: Q.Q4_1, 6: Q.Q5_0, 7: Q.Q5_1, 8: Q.Q8_0}


def clip_tensor_shapes() -> dict[str, tuple[int, ...]]:
    """clip.cpp's tensor names with numpy shapes (ggml's ne reversed), in the converter's order."""
    shapes: dict[str, tuple[int, ...]] = {
        "mm.0.weight": (N_PROJ, N_EMBD),
        "mm.0.bias": (N_PROJ,),
        "mm.2.weight": (N_PROJ, N_PROJ),
        "mm.2.bias": (N_PROJ,),
        "v.class_embd": (N_EMBD,),
        "v.patch_embd.weight": (N_EMBD, 3, PATCH, PATCH),  # a conv kernel: 4-D, never converted
        "v.position_embd.weight": (N_POSITIONS, N_EMBD),
        "v.pre_ln.weight": (N_EMBD,),
        "v.pre_ln.bias": (N_EMBD,),
    }
    for block in range(N_BLOCK):
        for part in ("attn_k", "attn_v", "attn_q", "attn_out"):
            shapes[f"v.blk.{block}.{part}.weight"] = (N_EMBD, N_EMBD)
            shapes[f"v.blk.{block}.{part}.bias"] = (N_EMBD,)
        shapes[f"v.blk.{block}.ln1.weight"] = (N_EMBD,)
        shapes[f"v.blk.{block}.ln1.bias"] = (N_EMBD,)
        shapes[f"v.blk.{block}.ffn_down.weight"] = (N_FF, N_EMBD)  # clip.cpp calls fc1 "ffn_down"
        shapes[f"v.blk.{block}.ffn_down.bias"] = (N_FF,)
        shapes[f"v.blk.{block}.ffn_up.weight"] = (N_EMBD, N_FF)
        shapes[f"v.blk.{block}.ffn_up.bias"] = (N_EMBD,)
        shapes[f"v.blk.{block}.ln2.weight"] = (N_EMBD,)
        shapes[f"v.blk.{block}.ln2.bias"] = (N_EMBD,)
    return shapes


def write_mmproj(path, dtype=np.float16) -> None:
    """An mmproj GGUF as the converter writes it with ftype 1: matrices in dtype, 1-D tensors F32."""
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_file_type(1)
    writer.add_name("test-mmproj")
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", IMAGE)
    writer.add_uint32("clip.vision.patch_size", PATCH)
    writer.add_uint32("clip.vision.embedding_length", N_EMBD)
    writer.add_uint32("clip.vision.feed_forward_length", N_FF)
    writer.add_uint32("clip.vision.projection_dim", N_PROJ)
    writer.add_uint32("clip.vision.attention.head_count", 4)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_uint32("clip.vision.block_count", N_BLOCK)
    writer.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    writer.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    writer.add_bool("clip.use_gelu", False)
    rng = np.random.default_rng(0)
    for name, shape in clip_tensor_shapes().items():
        values = rng.standard_normal(shape).astype(np.float32) * 0.05
        writer.add_tensor(name, values if len(shape) == 1 else values.astype(dtype))
    save_gguf(writer)


def expected_type(name: str, shape: tuple[int, ...], source: Q, requested: Q) -> Q:
    """clip-quantize-cli's rule, restated: 2-D "…weight" tensors take the requested type."""
    return requested if name.endswith("weight") and len(shape) == 2 else source


@pytest.fixture(scope="module")
def mmproj_f16(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "mmproj-f16.gguf"
    write_mmproj(path)
    return path


@pytest.mark.parametrize("type_id", sorted(CLIP_TYPE_IDS))
def test_mmproj_quantizes_as_clip_quantize_cli(mmproj_f16, tmp_path, capsys, type_id):
    requested = CLIP_TYPE_IDS[type_id]
    out = tmp_path / "mmproj-q.gguf"
    assert main(["--quiet", str(mmproj_f16), str(out), str(type_id)]) == 0
    assert f"read as a ggml type id (CLIP file): {requested.name} (ggml type {type_id})" in capsys.readouterr().err
    source, written = gguf.GGUFReader(mmproj_f16), gguf.GGUFReader(out)
    assert [t.name for t in written.tensors] == [t.name for t in source.tensors]  # the input's order
    for before, after in zip(source.tensors, written.tensors, strict=True):
        shape = tuple(int(n) for n in reversed(before.shape))
        assert after.tensor_type == expected_type(before.name, shape, before.tensor_type, requested), before.name
        if after.tensor_type == before.tensor_type:
            assert np.array_equal(tensor_rows(after), tensor_rows(before)), before.name
            continue
        rows = tensor_rows(before).view(np.float16).astype(np.float32)
        assert np.array_equal(tensor_rows(after), bpwopt.quantize(rows, requested)), before.name
        assert np.array_equal(tensor_rows(after), ggml_quantize(rows, requested)), before.name  # the old tool's call
    types = {t.name: t.tensor_type for t in written.tensors}
    assert types["v.position_embd.weight"] == types["mm.0.weight"] == types["v.blk.1.ffn_up.weight"] == requested
    assert types["v.patch_embd.weight"] == Q.F16  # 4-D conv kernel
    assert types["v.class_embd"] == types["v.blk.0.attn_q.bias"] == types["v.pre_ln.weight"] == Q.F32  # 1-D
    assert written.fields["general.file_type"].contents() == type_id  # the tool wrote the ggml type id
    assert written.fields["general.quantization_version"].contents() == 2
    kept = {k: f.contents() for k, f in source.fields.items() if not k.startswith(("GGUF.", "general.file_type"))}
    assert {k: written.fields[k].contents() for k in kept} == kept


def test_integer_7_is_q5_1_for_clip_but_q8_0_for_a_language_model(mmproj_f16, demo_model_path, tmp_path, capsys):
    assert main(["--quiet", "--dry-run", str(mmproj_f16), "7"]) == 0
    assert "Q5_1 (ggml type 7)" in capsys.readouterr().err
    assert main(["--quiet", "--dry-run", "--allow-requantize", str(demo_model_path), "7"]) == 0
    assert "read as a llama ftype id: Q8_0 (llama ftype 7)" in capsys.readouterr().err


def spec(name: str, ne: tuple[int, ...], source: Q = Q.F16) -> TensorSpec:
    return TensorSpec(name, ne, source)


def test_clip_rules_rows_no_longer_than_a_block_and_k_quant_embeddings():
    specs = [
        spec("v.position_embd.weight", (64, 5)),
        spec("mm.0.weight", (64, 96)),
        spec("mm.short.weight", (32, 96)),  # one Q4_K block is 256: kept; one Q4_0 block is 32: kept too
        spec("mm.odd.weight", (48, 96)),  # longer than 32 but no multiple of it: kept (the old tool aborted)
        spec("v.blk.0.ln1.weight", (64, 1), Q.F32),  # ggml_n_dims 1
    ]
    q4_0 = plan_clip_types(specs, PRESETS_BY_NAME["Q4_0"]).types()
    assert list(q4_0.values()) == [Q.Q4_0, Q.Q4_0, Q.F16, Q.F16, Q.F32]
    assert plan_clip_types(specs, PRESETS_BY_NAME["Q4_0"]).n_fallback == 1
    k_quant = [spec("v.position_embd.weight", (512, 5)), spec("mm.0.weight", (512, 96))]
    assert list(plan_clip_types(k_quant, PRESETS_BY_NAME["Q4_K_M"]).types().values()) == [Q.Q8_0, Q.Q4_K]
    ignored = plan_clip_types(specs, PRESETS_BY_NAME["Q8_0"], QuantizeOptions(ignore=("re:^mm\\.",)))
    assert ignored.types()["mm.0.weight"] == Q.F16 and ignored.types()["v.position_embd.weight"] == Q.Q8_0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{model}", "{tmp}/o.gguf", "9"], "unknown quantization type '9' for a CLIP file"),
        (["--prune-layers", "1", "{model}", "{tmp}/o.gguf", "8"], "--prune-layers does not apply to a CLIP"),
        (["{quantized}", "{tmp}/o.gguf", "8"], "CLIP quantization needs an F32 or F16 input"),
    ],
)
def test_clip_bad_input_is_one_line_and_exit_1(mmproj_f16, tmp_path, capsys, arguments, message):
    quantized = tmp_path / "mmproj-q8.gguf"
    assert main(["--quiet", str(mmproj_f16), str(quantized), "8"]) == 0
    capsys.readouterr()
    argv = [a.format(model=mmproj_f16, tmp=tmp_path, quantized=quantized) for a in arguments]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "o.gguf").exists()
