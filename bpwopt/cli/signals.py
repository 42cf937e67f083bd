"""SIGINT and SIGTERM as exceptions, so that a stopped run unwinds like a failed one.

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM kill the process
on the spot, leaving OUT.tmp and the state's -wal behind. Raised as an
exception instead, the signal goes through the same `finally` and `except
BaseException` paths as an error: the temporary is removed, the open
transaction rolled back (every measurement before it is committed), the
output left as it was, and `main` prints one line and exits 128 + the
signal's number. A signal the parent set to be ignored (`nohup`, `&` in a
script) stays ignored, as POSIX asks of programs that catch it.

A signal that lands while a Numba kernel hands its result back surfaces as a
SystemError whose cause is the KeyboardInterrupt; `stopping_signal` finds it
there, so that such a stop is not reported as a bug.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, as KeyboardInterrupt is, so that no `except Exception` swallows it."""


STOPPED_BY = {signal.SIGINT: "interrupted by SIGINT", signal.SIGTERM: "terminated by SIGTERM"}


def stopping_signal(error: BaseException) -> signal.Signals | None:
    """SIGINT or SIGTERM if error is, or was caused by, the exception that signal raised; else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt):
            return signal.SIGINT
        if isinstance(error, Terminated):
            return signal.SIGTERM
        error = error.__cause__ or error.__context__
    return None


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated; the previous handler is restored after it.

    Only the main thread can set handlers (a server calling `main` from a worker
    thread keeps its own), and an ignored SIGTERM is left ignored.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
