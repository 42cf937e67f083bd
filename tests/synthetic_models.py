"""Tiny Llama-shaped GGUFs that llama.cpp loads: the input kinds the product claims to take, in a few kB.

Width 256 and FFN 512, so every K-quant fits every matrix (the bundled real
models are 576 and 640 wide and cannot show that); two blocks; a byte-fallback
SentencePiece vocabulary of 259 + a few dozen pieces, so any text tokenizes.
Random weights at the scale of a trained model's (σ 0.02, norms 1).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from tests.conftest import save_gguf

N_EMBD, N_FF, N_HEAD, N_LAYER, N_EXPERT = 256, 512, 4, 2, 4
_WORDS = "the of and to in a is that for it as was with be by on not he this are or his"
_PIECES = [f"▁{word}" for word in _WORDS.split()]
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_BYTE = 1, 2, 3, 6


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *_PIECES]
    types = [_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_CONTROL, *[_TOKEN_BYTE] * 256, *[_TOKEN_NORMAL] * len(_PIECES)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(_PIECES))]
    return tokens, scores, types


N_VOCAB = len(_vocab()[0])


def _matrices(rng: np.random.Generator, moe: bool, tied: bool) -> dict[str, np.ndarray]:
    """Name -> float32 weights in numpy order (rows last-dimension-contiguous, as gguf writes them)."""

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {"token_embd.weight": weights(N_VOCAB, N_EMBD)}
    if not tied:
        tensors["output.weight"] = weights(N_VOCAB, N_EMBD)
    for layer in range(N_LAYER):
        block = f"blk.{layer}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors[f"{block}.{name}.weight"] = weights(N_EMBD, N_EMBD)
        if moe:
            tensors[f"{block}.ffn_gate_inp.weight"] = weights(N_EXPERT, N_EMBD)
            tensors[f"{block}.ffn_gate_exps.weight"] = weights(N_EXPERT, N_FF, N_EMBD)
            tensors[f"{block}.ffn_up_exps.weight"] = weights(N_EXPERT, N_FF, N_EMBD)
            tensors[f"{block}.ffn_down_exps.weight"] = weights(N_EXPERT, N_EMBD, N_FF)
        else:
            tensors[f"{block}.ffn_gate.weight"] = weights(N_FF, N_EMBD)
            tensors[f"{block}.ffn_up.weight"] = weights(N_FF, N_EMBD)
            tensors[f"{block}.ffn_down.weight"] = weights(N_EMBD, N_FF)
    return tensors


def _encoded(values: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


def write_tiny_llama(path: Path, qtype: Q = Q.F16, *, moe: bool = False, tied: bool = True, seed: int = 0) -> Path:
    """A loadable two-block Llama (MoE: four experts, two used) with every matrix in qtype, norms in F32."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-llama-{qtype.name.lower()}{'-moe' if moe else ''}{'' if tied else '-untied'}")
    writer.add_context_length(256)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_vocab_size(N_VOCAB)
    writer.add_file_type({Q.F32: 0, Q.F16: 1, Q.BF16: 32, Q.Q8_0: 7}[qtype])
    if moe:
        writer.add_expert_count(N_EXPERT)
        writer.add_expert_used_count(2)
    tokens, scores, types = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    for name, values in _matrices(rng, moe, tied).items():
        writer.add_tensor(name, _encoded(values, qtype), raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        if name.endswith("attn_output.weight"):
            writer.add_tensor(name.replace("attn_output", "attn_norm"), np.ones(N_EMBD, np.float32))
            writer.add_tensor(name.replace("attn_output", "ffn_norm"), np.ones(N_EMBD, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    save_gguf(writer)
    return path


def write_imatrix(path: Path, model: Path, seed: int = 1) -> Path:
    """llama-imatrix's GGUF for every matrix of model: <name>.in_sum2 (n_expert, n_per_row), <name>.counts."""
    rng = np.random.default_rng(seed)
    reader = gguf.GGUFReader(model)
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_array("imatrix.datasets", ["synthetic"])
    writer.add_uint32("imatrix.chunk_count", 10)
    writer.add_uint32("imatrix.chunk_size", 512)
    for tensor in reader.tensors:
        if len(tensor.shape) < 2 or tensor.name == "token_embd.weight":  # llama-imatrix has no entry for these
            continue
        n_per_row = int(tensor.shape[0])
        n_expert = int(tensor.shape[2]) if len(tensor.shape) > 2 else 1
        sums = rng.gamma(2.0, 1.0, (n_expert, n_per_row)).astype(np.float32) * 10
        writer.add_tensor(f"{tensor.name}.in_sum2", sums)
        writer.add_tensor(f"{tensor.name}.counts", np.full((n_expert, 1), 10.0, np.float32))
    save_gguf(writer)
    return path
