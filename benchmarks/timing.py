"""The one timing rule of the benchmarks: best wall time of `repeats` calls (the least disturbed run)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_seconds(function: Callable[[], object], repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings)
