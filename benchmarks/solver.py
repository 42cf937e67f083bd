"""Speed and optimality gap of the solver on a synthetic model of 1000 tensors × 15 candidate types.

Tensors have a transformer's shapes (token embedding, output, then layers of attn_q/k/v/output and
ffn_gate/up/down); each candidate type costs its exact ggml size (bytes per 256-element block)
and adds error ∝ elements × 2^(−2·bpw) × a per-tensor scale drawn log-uniformly over 4 decades,
times lognormal noise (σ = 0.05), so types of equal size differ and some are dominated. For each
target bpw the table gives the Lagrangian stage alone (best of --repeats) against `np.sort` of as
many float64 values as there are (tensor, type) options, timed in the same run, and the full exact
solve (Lagrangian, then HiGHS MILP) with the proven gap after each.

    python benchmarks/solver.py [--tensors 1000] [--repeats 5] [--time-limit 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import scipy
from timing import best_seconds

from bpwopt.solve.solver import TensorOptions, byte_range, solve

# ggml types between 2.6 and 16 bits per weight: bytes per block of 256 elements
BLOCK_BYTES = {
    "Q2_K": 84,
    "IQ3_XXS": 98,
    "Q3_K": 110,
    "IQ3_S": 110,
    "IQ4_XS": 136,
    "Q4_0": 144,
    "IQ4_NL": 144,
    "Q4_K": 144,
    "Q4_1": 160,
    "Q5_0": 176,
    "Q5_K": 176,
    "Q5_1": 192,
    "Q6_K": 210,
    "Q8_0": 272,
    "F16": 512,
}
TARGETS_BPW = (3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.5, 8.0)
HIDDEN, KV, FFN, VOCAB = 4096, 1024, 14336, 128256
LAYER_SHAPES = {
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (KV, HIDDEN),
    "attn_v": (KV, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (FFN, HIDDEN),
    "ffn_up": (FFN, HIDDEN),
    "ffn_down": (HIDDEN, FFN),
}


def tensor_shapes(n_tensors: int) -> list[tuple[str, int]]:
    """(name, elements) of the first n_tensors tensors of a deep transformer."""
    shapes = [("token_embd.weight", VOCAB * HIDDEN), ("output.weight", VOCAB * HIDDEN)]
    layer = 0
    while len(shapes) < n_tensors:
        shapes += [(f"blk.{layer}.{name}.weight", rows * cols) for name, (rows, cols) in LAYER_SHAPES.items()]
        layer += 1
    return shapes[:n_tensors]


def synthetic_problem(n_tensors: int, seed: int) -> tuple[list[TensorOptions], int]:
    """The problem and its total number of elements."""
    rng = np.random.default_rng(seed)
    labels = tuple(BLOCK_BYTES)
    block_bytes = np.array(list(BLOCK_BYTES.values()), dtype=np.int64)
    bits_per_weight = block_bytes * 8 / 256
    problem = []
    shapes = tensor_shapes(n_tensors)
    for name, elements in shapes:
        scale = 10 ** rng.uniform(0, 4)
        noise = rng.lognormal(0.0, 0.05, len(labels))
        error = elements * 2.0 ** (-2 * bits_per_weight) * scale * noise
        problem.append(TensorOptions(name, labels, elements // 256 * block_bytes, error))
    return problem, sum(elements for _, elements in shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds for each exact solve")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    problem, elements = synthetic_problem(args.tensors, args.seed)
    n_options = sum(len(t.labels) for t in problem)
    smallest, largest = byte_range(problem)
    print(
        f"{len(problem)} tensors × {len(BLOCK_BYTES)} types ({n_options} options), {elements / 1e9:.2f} G elements, "
        f"reachable {8 * smallest / elements:.3f}–{8 * largest / elements:.3f} bpw; "
        f"numpy {np.__version__}, scipy {scipy.__version__}, {platform.machine()}\n"
    )
    values = np.random.default_rng(args.seed).random(n_options)
    print(
        "| target bpw | budget (bytes) | Lagrangian (ms) | np.sort ref (ms) | ratio | gap after Lagrangian "
        "| exact solve (s) | stage | gap after MILP | error vs Lagrangian |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for target in TARGETS_BPW:
        budget = int(target * elements / 8)
        lagrangian = solve(problem, budget, exact=False)
        lagrangian_seconds = best_seconds(lambda budget=budget: solve(problem, budget, exact=False), args.repeats)
        sort_seconds = best_seconds(lambda: np.sort(values), args.repeats)
        exact = solve(problem, budget, time_limit=args.time_limit)
        improvement = exact.total_error / lagrangian.total_error - 1
        print(
            f"| {target:g} | {budget:,} | {1e3 * lagrangian_seconds:.1f} | {1e3 * sort_seconds:.2f} "
            f"| {lagrangian_seconds / sort_seconds:.0f} | {lagrangian.gap:.2e} | {exact.seconds:.2f} "
            f"| {exact.method} | {exact.gap:.2e} | {improvement:+.2e} |"
        )


if __name__ == "__main__":
    main()
