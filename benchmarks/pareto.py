"""Which types ever sit on a tensor's error-versus-size Pareto front: the evidence behind the default candidates.

Every quantized type bpwopt can write is measured on every tensor of a model's
off-grid F16 base (`bpwopt.quality.testbed`, as benchmarks/quality.py uses),
with or without that base's imatrix, into a state in --work (resumable). For
each tensor the types are ordered by size and a type is on the front when no
type of the same or smaller size has a lower weighted error. The table gives,
per type, the tensors that can take it (llama.cpp's fallbacks applied, so a
576-wide tensor "takes" IQ4_NL for Q4_K), how many of them have it on their
front and on its lower convex hull (the points a trade-off λ · bytes + error
ever picks; the exact solver may still take a point between two hull points
to use up a budget), and the seconds its measurements cost.

    python benchmarks/pareto.py --model gemma3 --imatrix yes --work W [--threads 2]
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import numba
from quality import MODELS, off_grid_base

from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.measure.records import Measurement
from bpwopt.quant.types import QUANT_TYPES, get_quant_type
from bpwopt.solve.targets import Target
from bpwopt.state.store import StateFile, read_identity

QUANTIZED = tuple(t.ggml_type for t in QUANT_TYPES.values() if t.block_size > 1)


def front_types(measured: list[Measurement]) -> list[str]:
    """The types of one tensor on its front: by size, each lowering the weighted error of every smaller one."""
    front, best = [], float("inf")
    for measurement in sorted(measured, key=lambda m: (m.nbytes, m.value("weighted_sse"))):
        if measurement.value("weighted_sse") < best:
            front.append(measurement.qtype)
            best = measurement.value("weighted_sse")
    return front


def hull_types(measured: list[Measurement]) -> list[str]:
    """The front's types on its lower convex hull: those a Lagrangian trade-off (λ · bytes + error) ever picks."""
    points = sorted(measured, key=lambda m: (m.nbytes, m.value("weighted_sse")))
    hull: list[Measurement] = []
    for point in points:
        if hull and point.value("weighted_sse") >= hull[-1].value("weighted_sse"):
            continue  # dominated: not even on the front
        while len(hull) >= 2 and _turns_up(hull[-2], hull[-1], point):
            hull.pop()
        hull.append(point)
    return [m.qtype for m in hull]


def _turns_up(a: Measurement, b: Measurement, c: Measurement) -> bool:
    """Whether b lies on or above the segment from a to c (so b is not on the lower hull)."""
    ea, eb, ec = (m.value("weighted_sse") for m in (a, b, c))
    return (eb - ea) * (c.nbytes - a.nbytes) >= (ec - ea) * (b.nbytes - a.nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--imatrix", choices=["yes", "no"], default="yes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, required=True, help="directory for the base and the state (resumable)")
    args = parser.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    base, imatrix_path = off_grid_base(args.model, args.work)
    imatrix = imatrix_path if args.imatrix == "yes" else None
    state_path = args.work / f"{args.model}-{'imat' if imatrix else 'plain'}-every-type.bpw_state"
    job = OptimizeJob(input_path=base, output_path=None, target=Target(bits_per_weight=8.0), imatrix_path=imatrix,
                      candidates=QUANTIZED, state_path=state_path, dry_run=True, progress=False)  # fmt: skip
    optimize_file(job)  # measures what the state lacks
    with StateFile.open(state_path, read_identity(state_path), create=False) as state:
        by_tensor: dict[str, list[Measurement]] = defaultdict(list)
        for measurement in state.measurements().values():
            by_tensor[measurement.tensor].append(measurement)
    takers, on_front, on_hull, seconds = Counter(), Counter(), Counter(), Counter()
    for measured in by_tensor.values():
        on_front.update(front_types(measured))
        on_hull.update(hull_types(measured))
        for measurement in measured:
            takers[measurement.qtype] += 1
            seconds[measurement.qtype] += measurement.seconds
    print(f"{args.model}, imatrix {args.imatrix}: {len(by_tensor)} tensors varied, "
          f"{sum(takers.values())} (tensor, type) pairs")  # fmt: skip
    print()
    print("| type | bpw | tensors that take it | on their front | on their convex hull | measuring s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in sorted(takers, key=lambda n: (get_quant_type(n).bits_per_weight, n)):
        bpw = get_quant_type(name).bits_per_weight
        print(f"| {name} | {bpw:.4g} | {takers[name]} | {on_front[name]} | {on_hull[name]} | {seconds[name]:.1f} |")


if __name__ == "__main__":
    main()
