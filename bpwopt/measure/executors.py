"""Executors: where measurement tasks run.

A task (`bpwopt.measure.measure.TensorTask`) is plain picklable data and its
function needs nothing but the model's files, so an executor may run it in
this process, in a pool of processes, or on another machine that sees the
same paths. Results come back as they finish, in any order; each names its
tensor.

On a Ray cluster (`RayExecutor`, `bpwopt ... --ray ADDRESS`) the workers read
the model from the task's path, which each of them must see (a shared file
system, or the same file copied to the same path): a task reads only its own
tensor's sampled rows, the same bytes the driver would otherwise have to read
and send, but every worker reads its share from storage at once instead of all
of it passing through the driver's one link. Only the imatrix weights of a
tensor travel with its task. The driver stays the state's
only writer: it stores each result as it arrives, so a killed driver loses the
tasks in flight and nothing else, and Ray reruns a task whose worker died.
"""

from __future__ import annotations

import itertools
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from bpwopt.errors import BpwoptError

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


TASK_RETRIES = 3  # a task whose worker process or node dies is run again this many times, then its error is raised
IN_FLIGHT_PER_CPU = 2  # tasks submitted ahead per cluster CPU: workers never wait, the driver holds few weights


class RayExecutor:
    """Each task as a Ray task on the cluster at address ("auto": the one this machine belongs to).

    At most IN_FLIGHT_PER_CPU × the cluster's CPUs tasks are submitted at a time, so the driver holds only
    their imatrix weights; results are yielded as they finish, and a task's own error is raised as it is.
    """

    def __init__(self, address: str) -> None:
        self.address = address

    def map(self, function: Callable[[Task], Result], tasks: Iterable[Task]) -> Iterator[Result]:
        try:
            import ray
        except ImportError:
            raise BpwoptError("--ray needs Ray: pip install 'bpwopt[ray]'") from None
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise BpwoptError(f"cannot connect to the Ray cluster at {self.address}: {error}") from None
        remote = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False)(function)
        window = max(1, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
        queue = iter(tasks)
        pending = [remote.remote(task) for task in itertools.islice(queue, window)]
        try:
            while pending:
                (done,), pending = ray.wait(pending, num_returns=1)
                try:
                    result = ray.get(done)
                except ray.exceptions.RayTaskError as error:  # its text is the worker's whole traceback
                    raise error.cause from None  # the task's own exception, as the in-process run raises it
                pending.extend(remote.remote(task) for task in itertools.islice(queue, 1))
                yield result
        finally:
            for reference in pending:  # stopped early (an error, a signal): nothing keeps running for us
                ray.cancel(reference, force=True)


def _check_reachable(address: str) -> None:
    """A host:port (or ray://host:port) that accepts no connection is refused at once: ray.init would wait on it."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise BpwoptError(f"cannot connect to the Ray cluster at {address}: {error.strerror or error}") from None
