"""The KLD search: which of llama.cpp's choices for a class of tensors beats the solver's, by measured KL divergence.

At the sizes people use the solver's plan and llama.cpp's preset of the same size
differ in a few classes of tensors, and that is where the prediction can be wrong
(SmolLM2 at Q5_K_M size with an imatrix: the preset's attn_v at Q8_0 in 14 of 30
layers beats the plan's Q5_1, ../shared/QUALITY-NOTES.md). llama.cpp's rules encode
what its authors measured about such classes; the search asks the model which of
them hold here. From the solver's plan, it holds one class at a time at the
preset's types, lets the solver spend the rest of the budget, writes that plan and
measures its KL divergence against the input model on the selection text (the
calibration articles the check never reads). The hold that lowers the KLD most,
by more than SIGNIFICANCE paired standard errors, is kept, and the next round
tries the remaining classes on top of it (greedy forward selection), until no
class helps, none is left, or the time budget would be passed. The plans tried
are few (one per class per round), each costs one write and one evaluation, and
each one's per-token KLD is stored in the state under its types and the text's
settings, so a rerun reuses every plan already measured.

The check (`bpwopt.quality.guarantee`) then compares the search's plan with the
preset on its own windows, which the search never saw: picking the best of
several plans on one text flatters the winner there, not on other text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from bpwopt.errors import OutOfReachError
from bpwopt.jobs.optimize import OptimizeJob, optimize_file, preset_types
from bpwopt.quality.evaluate import evaluate
from bpwopt.quality.texts import selection_text
from bpwopt.state.store import StateFile, read_identity

DEFAULT_CHUNKS = 4  # windows of the selection text per plan: as many as the check reads of its own text
DEFAULT_CTX = 512
SIGNIFICANCE = 2.0  # a hold is kept only if it lowers the KLD by this many paired standard errors


@dataclass(frozen=True)
class Trial:
    """One plan the search measured: the classes held at the preset's types, and its KLD on the selection text."""

    held: tuple[str, ...]
    mean_kld: float
    mean_kld_stderr: float
    reused: bool  # found in the state, not measured again


@dataclass(frozen=True)
class SearchReport:
    preset: str
    held: tuple[str, ...]  # the classes the chosen plan holds at the preset's types, in the order they were kept
    held_types: dict[str, GGMLQuantizationType]  # source name -> type: what the job is solved with (held_types)
    trials: tuple[Trial, ...]  # the solver's own plan first
    stopped: str  # why the search ended
    seconds: float


def search_holds(
    job: OptimizeJob,
    preset: str,
    *,
    seconds: float,
    scratch: Path,
    chunks: int = DEFAULT_CHUNKS,
    ctx: int = DEFAULT_CTX,
    threads: int | None = None,
) -> SearchReport:
    """Greedy forward selection of the preset's classes to hold, by KLD on the selection text, within seconds.

    job: the optimizer job of the user's budget (its output path is not used); scratch: the file each
    plan is written to, removed at the end. Raises BpwoptError as optimize_file and evaluate do.
    """
    started = time.perf_counter()
    text = selection_text()
    by_class: dict[str, dict[str, GGMLQuantizationType]] = {}
    for name, (category, qtype) in preset_types(job, preset).items():
        by_class.setdefault(category, {})[name] = qtype
    measure = _PlanMeasurer(job, scratch, text, chunks, ctx, threads)
    try:
        held: tuple[str, ...] = ()
        current_types, current = measure({})
        trials = [Trial(held, float(current.mean()), _stderr(current), measure.reused)]
        remaining = [c for c, types in sorted(by_class.items()) if any(current_types[n] != t for n, t in types.items())]
        stopped = "the plan already has the preset's types" if not remaining else ""
        longest = time.perf_counter() - started
        while remaining and not stopped:
            round_best: tuple[float, str, np.ndarray] | None = None
            for category in list(remaining):
                if time.perf_counter() - started + longest > seconds:
                    stopped = f"the time budget ({seconds:g} s) would be passed"
                    break
                began = time.perf_counter()
                holds = _holds(by_class, (*held, category))
                try:
                    _, kld = measure(holds)
                except OutOfReachError:
                    remaining.remove(category)  # the preset's types for it leave the rest no plan in budget
                    continue
                longest = max(longest, time.perf_counter() - began)
                trials.append(Trial((*held, category), float(kld.mean()), _stderr(kld), measure.reused))
                lead = current - kld
                score = float(lead.mean()) - SIGNIFICANCE * _stderr(lead)
                if round_best is None or score > round_best[0]:
                    round_best = (score, category, kld)
            if stopped:
                break
            if round_best is None or round_best[0] <= 0:
                stopped = "no class the preset sets otherwise lowers the KLD significantly"
                break
            _, category, current = round_best
            held = (*held, category)
            remaining.remove(category)
        if not remaining and not stopped:
            stopped = "every class the preset sets otherwise was tried"
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()
    return SearchReport(preset, held, _holds(by_class, held), tuple(trials), stopped, time.perf_counter() - started)


def _holds(by_class: dict[str, dict[str, GGMLQuantizationType]], classes: tuple[str, ...]) -> dict:
    """Source name -> the preset's type, for every tensor of the classes held."""
    return {name: qtype for category in classes for name, qtype in by_class[category].items()}


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0


class _PlanMeasurer:
    """Solve with some classes held, write the plan, measure its per-token KLD; plans the state has are reused.

    A plan is keyed by its types and the text's settings, so holds that lead to the same plan are measured once.
    """

    def __init__(self, job: OptimizeJob, scratch: Path, text: str, chunks: int, ctx: int, threads: int | None):
        self.job = replace(job, output_path=scratch, record_plan=False, compare_presets=False, progress=False)
        self.scratch, self.text, self.chunks, self.ctx, self.threads = scratch, text, chunks, ctx, threads
        self.settings = {"text": hashlib.sha256(text.encode()).hexdigest(), "chunks": chunks, "ctx": ctx}
        self.reused = False

    def __call__(self, holds: dict[str, GGMLQuantizationType]) -> tuple[dict[str, GGMLQuantizationType], np.ndarray]:
        plan = optimize_file(replace(self.job, held_types=holds, dry_run=True))
        types = {t.name: GGMLQuantizationType[t.qtype] for t in plan.tensors if t.varied}
        key = hashlib.sha256(
            json.dumps({"types": {n: t.name for n, t in sorted(types.items())}, **self.settings}).encode()
        ).hexdigest()
        stored = self._stored(key)
        self.reused = stored is not None
        if stored is not None:
            return types, stored
        optimize_file(replace(self.job, held_types=holds))
        result = evaluate(self.job.input_path, self.scratch, self.text, ctx=self.ctx, chunks=self.chunks,
                          threads=self.threads, progress=False)  # fmt: skip
        self._store(key, result.kld_per_token)
        return types, result.kld_per_token

    def _state(self) -> contextlib.AbstractContextManager[StateFile | None]:
        path = self.job.state_path
        if path is None or not path.is_file():
            return contextlib.nullcontext(None)
        return StateFile.open(path, read_identity(path), create=False)

    def _stored(self, key: str) -> np.ndarray | None:
        with self._state() as state:
            return state.searched(key) if state is not None else None

    def _store(self, key: str, kld: np.ndarray) -> None:
        with self._state() as state:
            if state is not None and not state.read_only:
                state.add_searched(key, kld)


def format_search(report: SearchReport) -> str:
    """One line per plan tried and what the search kept."""
    lines = [
        f"KLD search on the selection text: holding {', '.join(t.held) or 'nothing'} at {report.preset}'s types: "
        f"KLD {t.mean_kld:.5f} ± {t.mean_kld_stderr:.5f}{' (stored)' if t.reused else ''}" for t in report.trials
    ]  # fmt: skip
    kept = ", ".join(report.held) or "nothing"
    lines.append(f"kept holding {kept}: {report.stopped} ({report.seconds:.0f} s)")
    return "\n".join(lines)
