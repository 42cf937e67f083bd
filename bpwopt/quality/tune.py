"""`bpwopt tune`: fit the objective's free factors to measured KL divergence with optuna.

The solver's objective weighs each tensor's error by its group's stored
weight (`bpwopt calibrate`, or 1). What the measurements cannot tell is how
much a unit of error in one tensor class costs against another, or early
against late layers. Tuning answers that from the model's own output: each
trial gives every tensor class a factor (log-uniform, TUNED_RANGE) and the
blocks a depth factor (`bpwopt.solve.objective.tuned_factor`), solves each budget
with them, writes the plan, and measures its KLD against the unquantized
model on the calibration text (never the evaluation text). The score is the
mean log KLD over the budgets, so each budget counts by its ratio, not its
scale. Trial 0 is always the untuned objective (every factor 1), and the
best trial replaces it only when it wins by SIGNIFICANCE standard errors of
the scores: a study of a few dozen trials over nine factors otherwise keeps
whichever trial the text's noise favoured (benchmarks/RESULTS.md shows one).

The study lives in optuna's RDB storage beside the state (`STATE.optuna.db`,
SQLite), named after its settings: a killed run resumes where it stopped
(its unfinished trial is failed by optuna's heartbeat), and runs with other
budgets or text settings are separate studies. The best trial's factors go to
the state's `tuned` table, which later solves multiply into the objective.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from tqdm import tqdm

from bpwopt.errors import BpwoptError
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.quality.evaluate import evaluate
from bpwopt.quality.texts import calibration_text
from bpwopt.solve.objective import DEPTH_KEY
from bpwopt.solve.targets import Target
from bpwopt.state.store import StateFile, read_identity

DEFAULT_TRIALS = 30
DEFAULT_CTX = 256  # tokens per calibration window: each trial evaluates every budget, so windows are short
DEFAULT_CHUNKS = 4
TUNED_RANGE = (0.25, 4.0)  # a class factor, log-uniform: wider ranges spent most trials far from any optimum
DEPTH_RANGE = (-1.0, 1.0)  # exp(±1): 2.7× between the middle block and the first or last
SIGNIFICANCE = 2.0  # the best trial replaces the untuned objective only if it wins by this many standard errors
_HEARTBEAT_SECONDS = 60  # a trial whose process stopped beating this long ago (×2) is failed on resume


@dataclass(frozen=True)
class TrialResult:
    number: int
    tuning: dict[str, float]  # class -> factor, and DEPTH_KEY
    klds: tuple[float, ...]  # mean KLD at each budget, same order as the budgets
    score: float  # mean of log KLD over the budgets
    score_stderr: float  # its standard error, from the KLDs' (tokens of one text are not independent: a floor)


@dataclass(frozen=True)
class TuneReport:
    study_name: str
    storage: Path
    budgets: tuple[Target, ...]
    trials: tuple[TrialResult, ...]  # every completed trial of the study, this run's and earlier ones
    untuned: TrialResult  # trial 0: every factor 1
    best: TrialResult  # the lowest score
    chosen: TrialResult  # stored in the state's tuned table: best if it beats untuned significantly, else untuned


def storage_path(state_path: Path) -> Path:
    """Where a state's optuna studies live: beside it, so moving the state with it keeps them."""
    return state_path.with_name(state_path.name + ".optuna.db")


def study_name(objective: str, budgets: Sequence[Target], ctx: int, chunks: int, seed: int) -> str:
    """A study per setting: KLDs measured under other budgets or windows are not comparable."""
    return f"{objective}|{','.join(t.describe() for t in budgets)}|ctx{ctx}x{chunks}|seed{seed}"


def tune(
    solve: OptimizeJob,
    budgets: Sequence[Target],
    *,
    trials: int = DEFAULT_TRIALS,
    ctx: int = DEFAULT_CTX,
    chunks: int = DEFAULT_CHUNKS,
    seed: int = 0,
    work_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> TuneReport:
    """Run the study for `budgets` until it has `trials` completed trials; store the chosen factors in the state.

    solve: how each trial solves — its input_path (the unquantized model the
    state is, or will be, measured for), state_path (required), imatrix,
    options, candidates, sampling and objective are used; its target, output
    and tuning are set per trial, and trials skip the preset comparisons. budgets: the targets each trial solves
    and evaluates; ctx, chunks: calibration text windows per evaluation
    (bpwopt.quality.evaluate); work_dir: where each trial's plan is written (default: a
    temporary directory). Raises BpwoptError for bad settings or a state of
    another model or imatrix.
    """
    if not budgets:
        raise BpwoptError("give at least one budget (--target-bpw or --target-size) to tune at")
    if trials < 1:
        raise BpwoptError(f"--trials must be at least 1, got {trials}")
    if solve.state_path is None:
        raise BpwoptError("tuning needs a state file (--state-file): the study and its result are kept beside it")
    model_path, state_path = solve.input_path, solve.state_path
    plan_job = replace(solve, output_path=None, target=budgets[0], record_plan=False, dry_run=False, progress=False,
                       compare_presets=False)  # fmt: skip
    # a dry run measures what the state lacks (shown), and tells which classes vary and the objective solved
    first = optimize_file(replace(plan_job, dry_run=True, progress=solve.progress))
    classes = tuple(sorted({t.category for t in first.tensors if t.varied}))
    plan_job = replace(plan_job, objective=first.objective)
    untuned = {**{c: 1.0 for c in classes}, DEPTH_KEY: 0.0}
    name = study_name(plan_job.objective, budgets, ctx, chunks, seed)
    study = _open_study(storage_path(state_path), name, seed)
    if not _has_trial(study, untuned):
        study.enqueue_trial(untuned)  # the reference every tuned trial is compared with
    text = calibration_text()
    with tempfile.TemporaryDirectory(prefix="bpwopt-tune-", dir=work_dir) as directory:
        plan_path = Path(directory) / "trial.gguf"

        def run_trial(trial: optuna.Trial) -> float:
            tuning = {c: trial.suggest_float(c, *TUNED_RANGE, log=True) for c in classes}
            tuning[DEPTH_KEY] = trial.suggest_float(DEPTH_KEY, *DEPTH_RANGE)
            klds, errors = [], []
            for budget in budgets:
                optimize_file(replace(plan_job, output_path=plan_path, target=budget, tuning=tuning))
                result = evaluate(
                    model_path, plan_path, text, ctx=ctx, chunks=chunks, cache_dir=cache_dir, threads=threads,
                    progress=False,
                )  # fmt: skip
                klds.append(result.mean_kld)
                errors.append(result.mean_kld_stderr)
            trial.set_user_attr("klds", klds)
            trial.set_user_attr("kld_stderrs", errors)
            return _score(klds)

        remaining = max(0, trials - len(_completed(study)))
        with tqdm(total=remaining, desc="tuning", unit="trial", disable=not progress) as bar:
            study.optimize(run_trial, n_trials=remaining, callbacks=[lambda *_: bar.update()], catch=())
    completed = _completed(study)
    best = min(completed, key=lambda t: t.score)
    reference = next((t for t in completed if t.tuning == untuned), None)
    if reference is None:
        raise BpwoptError(f"study {name!r} has no completed untuned trial; run bpwopt tune again to finish it")
    chosen = choose_trial(best, reference)
    with StateFile.open(state_path, read_identity(state_path), create=False) as state:
        state.set_values("tuned", chosen.tuning)
    return TuneReport(name, storage_path(state_path), tuple(budgets), tuple(completed), reference, best, chosen)


def _open_study(storage: Path, name: str, seed: int) -> optuna.Study:
    optuna.logging.set_verbosity(logging.WARNING)  # a line per trial on stderr otherwise
    with warnings.catch_warnings():  # heartbeats and multivariate TPE are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = optuna.storages.RDBStorage(
            f"sqlite:///{storage}", heartbeat_interval=_HEARTBEAT_SECONDS, grace_period=2 * _HEARTBEAT_SECONDS
        )
        study = optuna.create_study(study_name=name, storage=rdb, load_if_exists=True)
        optuna.storages.fail_stale_trials(study)  # a killed run's unfinished trial
        # seeded past the trials already run, so a resumed study does not draw its first random trials again
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), multivariate=True, n_startup_trials=8)
    return study


def _has_trial(study: optuna.Study, params: dict[str, float]) -> bool:
    """Whether a trial with these parameters completed, runs, or waits in the queue (enqueued, not yet run)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    trials = study.get_trials(deepcopy=False, states=states)
    return any(params in (t.params, t.system_attrs.get("fixed_params")) for t in trials)


def choose_trial(best: TrialResult, untuned: TrialResult) -> TrialResult:
    """The best trial if it beats the untuned one by SIGNIFICANCE combined standard errors, else the untuned one."""
    # a tuned table is only worth storing when its gain clears the noise of the KLD it was judged on
    margin = SIGNIFICANCE * math.hypot(best.score_stderr, untuned.score_stderr)
    return best if best.score < untuned.score - margin else untuned


def _score(klds: Sequence[float]) -> float:
    """Mean log KLD; a plan identical to the base (KLD 0) cannot happen at a budget below it."""
    return sum(math.log(max(kld, 1e-12)) for kld in klds) / len(klds)


def _completed(study: optuna.Study) -> list[TrialResult]:
    results = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        klds, errors = t.user_attrs["klds"], t.user_attrs["kld_stderrs"]
        stderr = math.sqrt(sum((e / k) ** 2 for k, e in zip(klds, errors, strict=True) if k > 0)) / len(klds)
        results.append(TrialResult(t.number, dict(t.params), tuple(klds), float(t.value), stderr))
    return results


def format_report(report: TuneReport) -> str:
    """The untuned and best trials' KLDs per budget, and the best factors."""
    budgets = [t.describe() for t in report.budgets]
    lines = [f"study {report.study_name!r} in {report.storage}: {len(report.trials)} trials"]
    lines.append(f"{'trial':<16} " + " ".join(f"{b:>18}" for b in budgets) + f" {'score':>9} {'±':>7}")
    for label, trial in (("untuned", report.untuned), ("best", report.best)):
        label = f"{label} (#{trial.number})"
        scores = f" {trial.score:>9.4f} {trial.score_stderr:>7.4f}"
        lines.append(f"{label:<16} " + " ".join(f"{k:>18.5f}" for k in trial.klds) + scores)
    if report.chosen is report.best and report.best is not report.untuned:
        factors = ", ".join(f"{key}={value:.3g}" for key, value in sorted(report.best.tuning.items()))
        lines.append(f"stored the best trial's factors: {factors}")
    else:
        lines.append(f"kept the untuned objective: no trial beat it by {SIGNIFICANCE:g} standard errors")
    return "\n".join(lines)
