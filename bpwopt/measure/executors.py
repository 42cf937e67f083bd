"""Executors: where measurement tasks run.

A task (`bpwopt.measure.measure.TensorTask`) is plain picklable data and its
function needs nothing but the model's files, so an executor may run it in
this process, in a pool of processes, or on another machine that sees the
same paths. Results come back as they finish, in any order; each names its
tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


class Executor(Protocol):
    """Runs function on every task and yields the results as they finish (in any order)."""

    def map(self, function: Callable[[Task], Result], tasks: Iterable[Task]) -> Iterator[Result]: ...


class InProcessExecutor:
    """One task after the other, in this process: results in task order, the first error raised at once."""

    def map(self, function: Callable[[Task], Result], tasks: Iterable[Task]) -> Iterator[Result]:
        for task in tasks:
            yield function(task)
