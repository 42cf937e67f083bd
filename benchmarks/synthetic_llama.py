"""Llama-shaped F16 GGUFs with synthetic weights, for speed and memory at real model sizes.

No small real model with 256-multiple widths is on the registries, and a
real 8B model cannot be downloaded here, so the scale benchmark generates one:
the tensor names, shapes and metadata of Llama-3.2-1B or Llama-3.1-8B, with
weights that have what makes quantization work hard on trained ones: heavy
tails (Student t, 5 degrees of freedom) and row scales that vary over a
decade (log-normal). Norm weights are F32 near 1, as in trained models.
Weights are generated a slab at a time and streamed to disk (the file is
never held in memory) from a seed, so a shape and seed always give the same
file. The files are large (1B: 2.5 GB, 8B: 16 GB) and are never committed.

    python benchmarks/synthetic_llama.py --shape 1b OUT.gguf [--seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from bpwopt.formats.gguf_writer import TensorSlot, encode_kv, write_gguf

SLAB_ELEMENTS = 16 << 20  # weights generated at a time (float64 work arrays: 128 MiB)
T_DEGREES_OF_FREEDOM = 5


@dataclass(frozen=True)
class LlamaShape:
    name: str
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    tied_embeddings: bool

    @property
    def n_embd_kv(self) -> int:
        return self.n_embd // self.n_head * self.n_head_kv


SHAPES = {
    "1b": LlamaShape("Llama-3.2-1B-shaped", 2048, 8192, 16, 32, 8, 128256, tied_embeddings=True),
    "8b": LlamaShape("Llama-3.1-8B-shaped", 4096, 14336, 32, 32, 8, 128256, tied_embeddings=False),
}


def tensor_shapes(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml shape: row length first) in llama.cpp's file order."""
    e, kv, ff = shape.n_embd, shape.n_embd_kv, shape.n_ff
    tensors: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (e, shape.n_vocab))]
    for layer in range(shape.n_layer):
        block = f"blk.{layer}"
        tensors += [
            (f"{block}.attn_norm.weight", (e,)),
            (f"{block}.attn_q.weight", (e, e)),
            (f"{block}.attn_k.weight", (e, kv)),
            (f"{block}.attn_v.weight", (e, kv)),
            (f"{block}.attn_output.weight", (e, e)),
            (f"{block}.ffn_norm.weight", (e,)),
            (f"{block}.ffn_gate.weight", (e, ff)),
            (f"{block}.ffn_up.weight", (e, ff)),
            (f"{block}.ffn_down.weight", (ff, e)),
        ]
    tensors.append(("output_norm.weight", (e,)))
    if not shape.tied_embeddings:
        tensors.append(("output.weight", (e, shape.n_vocab)))
    return tensors


def _metadata(shape: LlamaShape, seed: int) -> list[bytes]:
    u32, f32, text = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    return [
        encode_kv("general.architecture", text, "llama"),
        encode_kv("general.name", text, f"{shape.name} synthetic (seed {seed})"),
        encode_kv("general.file_type", u32, 1),  # LLAMA_FTYPE_MOSTLY_F16
        encode_kv("llama.context_length", u32, 131072),
        encode_kv("llama.embedding_length", u32, shape.n_embd),
        encode_kv("llama.block_count", u32, shape.n_layer),
        encode_kv("llama.feed_forward_length", u32, shape.n_ff),
        encode_kv("llama.attention.head_count", u32, shape.n_head),
        encode_kv("llama.attention.head_count_kv", u32, shape.n_head_kv),
        encode_kv("llama.attention.layer_norm_rms_epsilon", f32, 1e-5),
        encode_kv("llama.rope.freq_base", f32, 500000.0),
        encode_kv("llama.vocab_size", u32, shape.n_vocab),
    ]


def _weight_pieces(ggml_shape: tuple[int, ...], rng: np.random.Generator) -> Iterator[np.ndarray]:
    """float16 rows of a heavy-tailed matrix whose row scales spread over about a decade."""
    row_length, n_rows = ggml_shape
    rows_per_slab = max(1, SLAB_ELEMENTS // row_length)
    unit = np.sqrt(T_DEGREES_OF_FREEDOM / (T_DEGREES_OF_FREEDOM - 2))  # the t distribution's standard deviation
    for start in range(0, n_rows, rows_per_slab):
        rows = min(rows_per_slab, n_rows - start)
        scales = 0.02 * np.exp(rng.normal(0.0, 0.6, size=(rows, 1)))
        yield (rng.standard_t(T_DEGREES_OF_FREEDOM, size=(rows, row_length)) * (scales / unit)).astype(np.float16)


def write_synthetic_llama(shape: LlamaShape, out_path: Path, seed: int = 0) -> int:
    """Write the model atomically; returns its bytes."""
    shapes = tensor_shapes(shape)
    slots = [
        TensorSlot(name, dims, GGMLQuantizationType.F32 if len(dims) == 1 else GGMLQuantizationType.F16,
                   int(np.prod(dims)) * (4 if len(dims) == 1 else 2))
        for name, dims in shapes
    ]  # fmt: skip

    def produce(index: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([seed, index])
        dims = shapes[index][1]
        if len(dims) == 1:
            return iter([(1.0 + 0.05 * rng.standard_normal(dims[0])).astype(np.float32)])
        return _weight_pieces(dims, rng)

    return write_gguf(out_path, _metadata(shape, seed), slots, produce)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    size = write_synthetic_llama(SHAPES[args.shape], args.out, args.seed)
    print(f"wrote {args.out} ({size:,} bytes)")


if __name__ == "__main__":
    main()
