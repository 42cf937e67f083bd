"""The problem the solver sees, built one way for the optimizer, the plots and tune.

Each varied tensor's options are its measured types as (bytes in the target's
units, error under the objective times the tensor's weight); every other
tensor is a fixed cost. `tensor_options` is the one place measurements become
options, so a plot's curve and the optimizer's plan rest on the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from bpwopt.measure.records import Measurement, TensorRecord
from bpwopt.policy.llama import TensorPlan, TypePlan
from bpwopt.solve.objective import option_errors
from bpwopt.solve.solver import TensorOptions, byte_range


def tensor_options(
    name: str,
    measured: Sequence[Measurement],
    record: TensorRecord,
    objective: str,
    weight: float = 1.0,
    cost: Callable[[int], int] = int,
) -> TensorOptions:
    """One tensor's options in the order of measured: cost(bytes of each type) and its objective error × weight."""
    return TensorOptions(
        name=name,
        labels=tuple(m.qtype for m in measured),
        nbytes=np.array([cost(m.nbytes) for m in measured], dtype=np.int64),
        error=option_errors(objective, measured, record, weight),
    )


@dataclass(frozen=True)
class Problem:
    """The optimization the solver sees: options of the varied tensors, and the fixed rest."""

    base: TypePlan  # the policy's plan; varied tensors are replaced by the solver's choice
    varied: tuple[TensorPlan, ...]
    options: tuple[TensorOptions, ...]  # same order as varied
    fixed_cost: int  # bytes of everything not varied, in the target's units
    elements: int

    def types(self, choice: np.ndarray) -> dict[str, GGMLQuantizationType]:
        """Written name -> type for a solver choice, in output order."""
        chosen = {
            plan.name: GGMLQuantizationType[opts.labels[index]]
            for plan, opts, index in zip(self.varied, self.options, choice, strict=True)
        }
        return {t.name: chosen.get(t.name, t.target_type) for t in self.base.tensors}

    def cost(self, choice: np.ndarray) -> int:
        """Bytes of the varied tensors for a choice, in the solver's units."""
        return int(sum(int(opts.nbytes[i]) for opts, i in zip(self.options, choice, strict=True)))

    def choice_of(self, types: Mapping[str, GGMLQuantizationType]) -> np.ndarray | None:
        """The solver choice that gives each varied tensor its type in types, or None if one was not measured."""
        choice = []
        for plan, opts in zip(self.varied, self.options, strict=True):
            label = types[plan.name].name
            if label not in opts.labels:
                return None
            choice.append(opts.labels.index(label))
        return np.array(choice, dtype=np.int64)


def build_problem(
    base: TypePlan,
    varied: Sequence[TensorPlan],
    types_of: Mapping[str, Sequence[GGMLQuantizationType]],
    measurements: Mapping[tuple[str, str], Measurement],
    records: Mapping[str, TensorRecord],
    objective: str,
    weight_of: Mapping[str, float],
    cost_of: Callable[[TensorPlan, int], int],
    fixed_cost: int,
    elements: int,
) -> Problem:
    """The solver's problem: varied tensors' measured types as options, the rest of base as a fixed cost.

    types_of: source name -> the types measured for it; cost_of(tensor, data bytes): those bytes in
    the target's units (padded in the file for a size target); fixed_cost: the same for the tensors
    not varied, in their base types.
    """
    options = tuple(
        tensor_options(
            plan.name,
            [measurements[(plan.source_name, t.name)] for t in types_of[plan.source_name]],
            records[plan.source_name],
            objective,
            weight_of[plan.source_name],
            lambda nbytes, plan=plan: cost_of(plan, nbytes),
        )
        for plan in varied
    )
    return Problem(base, tuple(varied), options, fixed_cost, elements)


def useful_range(options: Sequence[TensorOptions]) -> tuple[int, int]:
    """Bytes of the smallest plan and of the least-error plan (each tensor's best type, fewest bytes on ties).

    Budgets above the least-error plan buy nothing: on a model that ships
    quantized, a bigger type can even be worse than a smaller one whose grid
    holds the source's values exactly (Q6_K against Q8_0 on a Q4_1 source).
    """
    smallest = byte_range(options)[0]
    best = 0
    for opts in options:
        best_error = opts.error.min()
        best += int(opts.nbytes[opts.error == best_error].min())
    return smallest, best
