"""Command line: parses arguments, calls the pipeline functions, prints.

No algorithm lives here. A BpwoptError (something the user can fix) becomes
one line on stderr and exit status 1; argparse's own usage errors exit 2. Any
other exception is a bug of ours: one line names it and where its traceback
was saved, exit status 70; `--debug` (or BPWOPT_DEBUG=1) shows the traceback.
SIGINT and SIGTERM are one line too, exit status 130 and 143 (`signals`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numba
from gguf import GGMLQuantizationType, GGUFValueType

from bpwopt import __version__
from bpwopt.cli.config import config_argv
from bpwopt.cli.signals import STOPPED_BY, Terminated, sigterm_raises, stopping_signal
from bpwopt.errors import BpwoptError
from bpwopt.formats.files import cache_dir
from bpwopt.formats.output_paths import with_budget
from bpwopt.formats.splits import SPLIT_KEYS
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.jobs.quantize import QuantizeJob, default_output_path, quantize_file
from bpwopt.jobs.report import describe_written, format_plan, report_as_dict
from bpwopt.measure.measure import DEFAULT_CANDIDATES, Sampling
from bpwopt.policy.llama import QuantizeOptions, parse_tensor_type_option
from bpwopt.policy.presets import PRESETS_BY_NAME, format_presets_help, parse_ggml_type_name
from bpwopt.quality.calibrate import (
    DEFAULT_CHUNKS,
    DEFAULT_NOISE,
    DEFAULT_PROBE,
    PROBE_BPW,
    PROBE_OBJECTIVE,
    PROBES,
    calibrate,
    format_report,
)
from bpwopt.quality.calibrate import DEFAULT_CTX as CALIBRATION_CTX
from bpwopt.quality.evaluate import evaluate, record_evaluation
from bpwopt.quality.guarantee import CHECK_MODES, checked_optimize, format_check, wants_check
from bpwopt.quality.texts import evaluation_text
from bpwopt.quality.tune import DEFAULT_CHUNKS as TUNE_CHUNKS
from bpwopt.quality.tune import DEFAULT_CTX as TUNE_CTX
from bpwopt.quality.tune import DEFAULT_TRIALS, tune
from bpwopt.quality.tune import format_report as format_tune_report
from bpwopt.quant.types import DEFAULT_ROUNDING, QUANT_TYPES, ROUNDINGS
from bpwopt.serve.journal import JOURNAL_NAME
from bpwopt.serve.server import DEFAULT_PORT, serve
from bpwopt.solve.objective import DEFAULT_GROUPING, DEFAULT_OBJECTIVE, GROUPINGS, OBJECTIVES
from bpwopt.solve.targets import Target, parse_size
from bpwopt.source.summary import format_summary, inspect_gguf, summary_as_dict

OBJECTIVE_HELP = (
    f"what the solver minimizes (default: relative once `bpwopt calibrate` stored group weights, else "
    f"{DEFAULT_OBJECTIVE})"
)
SUBCOMMANDS = ("inspect", "eval", "plot", "calibrate", "tune", "serve")
DEBUG_VARIABLE = "BPWOPT_DEBUG"
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug of bpwopt's, not the user's
ROUNDING_HELP = (
    "ggml (default): the bytes llama-quantize writes; best: blocks of every quantized type with less "
    "imatrix-weighted error than ggml's where a search finds them (same format, any llama.cpp loads it)"
)
_DEBUG_HELP = f"show the full traceback of an internal error (also {DEBUG_VARIABLE}=1)"
_DEFAULT_NAMES = [t.name for t in DEFAULT_CANDIDATES]
_TARGET_HELP = (
    "With --target-bpw or --target-size, bpwopt measures the error every candidate type adds to every "
    "tensor and picks the types that hit the budget with the least error; TYPE is then optional and is the "
    "preset the plan is compared with."
)
_OVERRIDE_TYPES = {
    "int": (GGUFValueType.UINT32, lambda text: _uint32(abs(int(text)))),  # llama.cpp writes ints as u32
    "float": (GGUFValueType.FLOAT32, float),
    "bool": (GGUFValueType.BOOL, lambda text: {"true": True, "false": False}[text]),
    "str": (GGUFValueType.STRING, str),
}


def _inspect(args: argparse.Namespace) -> None:
    summary = inspect_gguf(args.file)
    if args.json:
        print(json.dumps(summary_as_dict(summary), indent=2))
    else:
        print(format_summary(summary, per_tensor=args.tensors))


def _evaluate(args: argparse.Namespace) -> None:
    text = _read_text(args.text) if args.text else evaluation_text()
    result = evaluate(args.base, args.quant, text, ctx=args.ctx, chunks=args.chunks, threads=args.threads)
    if args.state_file:
        record_evaluation(args.state_file, args.quant, result, text)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    print(
        f"{args.quant}: mean KLD {result.mean_kld:.6f} ± {result.mean_kld_stderr:.6f}, median {result.median_kld:.6f}, "
        f"p99 {result.p99_kld:.6f}, max {result.max_kld:.4f}; same top token {100 * result.same_top_rate:.2f} %; "
        f"PPL {result.ppl_quant:.4f} (base {result.ppl_base:.4f}); {result.tokens} tokens, {result.seconds:.1f} s"
    )


def _serve(args: argparse.Namespace) -> None:
    serve(args.host, args.port, args.root or [Path.cwd()], args.jobs_file)


def _plot(args: argparse.Namespace) -> None:
    from bpwopt.quality.plots import parse_formats, plot_state  # matplotlib loads only for this subcommand

    written, skipped = plot_state(
        args.state, args.out, args.model, plan_id=args.plan, formats=parse_formats(args.format),
        objective=args.objective,
    )  # fmt: skip
    for line in skipped:
        print(f"bpwopt: skipped {line}", file=sys.stderr)
    for path in written:
        print(path)


def _calibrate(args: argparse.Namespace) -> None:
    report = calibrate(
        args.model, args.state_file, imatrix_path=args.imatrix, grouping=args.groups, probe=args.probe,
        noise=args.noise,
        chunks=args.chunks, ctx=args.ctx, only=args.only.split(",") if args.only else None, seed=args.seed,
        fresh=args.fresh, threads=args.threads, progress=not args.quiet,
    )  # fmt: skip
    if args.json:
        settings = {"probe": report.probe, "noise": report.noise, "chunks": report.chunks, "ctx": report.ctx}
        print(json.dumps({**settings, "weights": report.weights, "groups": [vars(g) for g in report.groups]}, indent=2))
        return
    print(format_report(report))
    print(f"bpwopt: stored {len(report.weights)} group weights in {args.state_file}; later solves use them "
          "(--ignore-tensor-importance to solve without)", file=sys.stderr)  # fmt: skip


def _tune(args: argparse.Namespace) -> None:
    budgets = [Target(bits_per_weight=bpw) for bpw in args.target_bpw or ()]
    budgets += [Target(file_bytes=parse_size(size)) for size in args.target_size or ()]
    if not budgets:
        raise BpwoptError("give at least one budget to tune at: --target-bpw BPW... or --target-size SIZE...")
    solve = OptimizeJob(
        input_path=args.model, output_path=None, target=budgets[0],
        options=QuantizeOptions(allow_requantize=args.allow_requantize), imatrix_path=args.imatrix,
        candidates=parse_candidates(args.candidates), sampling=Sampling(max_rows=args.sample_rows, rse=args.sample_rse),
        rounding=args.rounding, state_path=args.state_file, objective=args.objective, progress=not args.quiet,
    )  # fmt: skip
    _set_threads(args.threads)
    report = tune(
        solve, budgets, trials=args.trials, ctx=args.ctx, chunks=args.chunks, seed=args.seed, threads=args.threads,
        progress=not args.quiet,
    )  # fmt: skip
    if args.json:
        summary = {"study": report.study_name, "storage": str(report.storage), "trials": len(report.trials),
                   "budgets": [b.describe() for b in report.budgets]}  # fmt: skip
        trials = {"untuned": vars(report.untuned), "best": vars(report.best), "chosen": vars(report.chosen)}
        print(json.dumps(summary | trials, indent=2))
        return
    print(format_tune_report(report))
    print(f"bpwopt: stored the best factors in {args.state_file}; later solves use them "
          "(--ignore-tensor-importance to solve without)", file=sys.stderr)  # fmt: skip


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BpwoptError(f"cannot read text {path}: {error}") from None


def _uint32(value: int) -> int:
    if value >= 2**32:
        raise BpwoptError(f"--override-kv: {value} does not fit in the 32 bits llama.cpp writes an int in")
    return value


def parse_override_kv(text: str) -> tuple[str, tuple[GGUFValueType, object]]:
    """--override-kv KEY=TYPE:VALUE, TYPE one of int, float, bool, str (llama.cpp's spelling)."""
    key, _, rest = text.partition("=")
    kind, _, value = rest.partition(":")
    if not key or kind not in _OVERRIDE_TYPES:
        raise BpwoptError(f"--override-kv {text!r}: expected KEY=TYPE:VALUE with TYPE one of int, float, bool, str")
    if key == "general.alignment" or key in SPLIT_KEYS:  # the files' layout and naming; another value mislabels them
        raise BpwoptError(f"--override-kv {text!r}: {key} cannot be overridden")
    value_type, convert = _OVERRIDE_TYPES[kind]
    try:
        return key, (value_type, convert(value))
    except (ValueError, KeyError) as error:
        raise BpwoptError(f"--override-kv {text!r}: {value!r} is not a valid {kind}") from error


def build_quantize_parser() -> argparse.ArgumentParser:
    """llama-quantize's command line, same spellings and meanings."""
    parser = argparse.ArgumentParser(
        prog="bpwopt",
        usage=(
            "bpwopt [options] IN.gguf [OUT.gguf] TYPE [THREADS]\n"
            "       bpwopt [options] --target-size SIZE | --target-bpw X IN.gguf [OUT.gguf] [TYPE] [THREADS]\n"
            "       bpwopt {inspect,eval,plot,calibrate,tune,serve} ... (bpwopt SUBCOMMAND --help)"
        ),
        description=(
            "Quantize a GGUF model as llama-quantize does (drop-in), or to a size or bits-per-weight target.\n\n"
            "subcommands:\n"
            "  inspect    tensors, types, bytes and bits per weight of any GGUF\n"
            "  eval       KL divergence, top-token agreement and perplexity of a quantized model against its base\n"
            "  plot       plots of a state file: trade-off, a plan's bits per layer, per-tensor errors\n"
            "  calibrate  per-group sensitivities (KLD on the calibration text); later solves and --check use them\n"
            "  tune       fit the objective's per-class and depth factors to measured KLD\n"
            "  serve      a local web page and JSON API over the models and states under --root folders"
        ),
        epilog="TYPE (name or number):\n" + format_presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bpwopt {__version__}")
    add = parser.add_argument
    add(
        "--config", metavar="FILE", type=Path,
        help="options from a .toml, .yaml or .yml file: keys are the long option names below (- or _), plus "
        "input, output, type for IN.gguf, OUT.gguf, TYPE; flags true/false, repeatable options a list. Options given "
        "here win; a repeatable one given here (--tensor-type, --ignore, --override-kv, --include-weights, "
        "--exclude-weights) replaces the file's list; IN [OUT] [TYPE] given here replace input, output and type",
    )  # fmt: skip
    add("--allow-requantize", action="store_true", help="allow requantizing tensors that are already quantized")
    add("--leave-output-tensor", action="store_true", help="leave output.weight un(re)quantized")
    add("--pure", action="store_true", help="disable k-quant mixtures: all tensors to the same type")
    add("--imatrix", metavar="FILE", type=Path, help="importance matrix (llama-imatrix's GGUF or legacy .dat)")
    add("--include-weights", metavar="NAME", action="append", default=[], help="use the imatrix only for these")
    add("--exclude-weights", metavar="NAME", action="append", default=[], help="do not use the imatrix for these")
    add("--output-tensor-type", metavar="TYPE", help="ggml type for output.weight")
    add("--token-embedding-type", metavar="TYPE", help="ggml type for the token embeddings")
    add("--tensor-type", metavar="NAME=TYPE", action="append", default=[], help="type for matching tensors")
    add("--override-kv", metavar="KEY=TYPE:VALUE", action="append", default=[], help="override metadata")
    add("--prune-layers", metavar="L0,L1,...", help="remove these layers; later ones are renumbered")
    add("--keep-split", action="store_true", help="write the output in the same shards as the input")
    add("--rounding", choices=ROUNDINGS, default=DEFAULT_ROUNDING, help=ROUNDING_HELP)
    add("--dry-run", action="store_true", help="print the sizes (with a target: the plan), write nothing")
    add(
        "--check", choices=CHECK_MODES, default="auto",
        help="with a target: write the plan and the largest llama.cpp preset that fits (with --rounding best, also "
        "that preset in best rounding), measure each one's KLD on the calibration text (llama-cpp-python), keep the "
        "lowest that beats the preset by 2 standard errors, else the preset; auto: when --state-file was calibrated",
    )  # fmt: skip
    add("--quiet", action="store_true", help="no progress bar")
    add("--threads", type=int, metavar="N", help="threads for quantizing and measuring (default: all cores)")
    target = parser.add_argument_group("optimizer (bpwopt's own)", _TARGET_HELP)
    add = target.add_argument
    add("--target-bpw", type=float, metavar="X", help="at most X bits per weight (tensor data / elements)")
    add("--target-size", metavar="SIZE", help="at most SIZE for the whole file: 1.5gb, 1500MB, 800MiB, 2G, bytes; "
        "a list (2gb,3gb,4gb) writes one file per size, OUT-2gb.gguf …, from one measurement")
    add("--save-state", action="store_true", help="keep measurements in state/<model>-<hash>-mse.bpw_state")
    add("--state-file", metavar="FILE", type=Path, help="load measurements from and save them to FILE")
    add("--candidates", metavar="T1,T2,...", help="candidate types (default: " + ",".join(_DEFAULT_NAMES) + ")")
    add("--ignore", metavar="REGEX", action="append", default=[], help="matching tensors keep their source type")
    add("--objective", choices=OBJECTIVES, help=OBJECTIVE_HELP)
    add("--ignore-tensor-importance", action="store_true", help="do not apply stored per-group weights")
    add("--precise", action="store_true", help="measure every row of every tensor (no sampling)")
    add("--sample-rows", type=int, default=Sampling.max_rows, metavar="N", help="most rows measured per tensor")
    add("--sample-rse", type=float, default=Sampling.rse, metavar="X", help="grow a tensor's row sample until "
        f"each error's relative standard error is at most X (default {Sampling.rse:g}; 0: always --sample-rows)")
    add("--seed", type=int, default=0, help="seed of the row sample")
    add("--ray", metavar="ADDRESS", help="measure on the Ray cluster at ADDRESS (host:port, or auto); its workers "
        "must see IN at the same path; pip install 'bpwopt[ray]'")  # fmt: skip
    add("--time-limit", type=float, default=10.0, metavar="S", help="seconds for the exact solver stage")
    add("--json", action="store_true", help="machine-readable summary on stdout")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # "*", not "+": a --config file may hold them; parse_quantize_args requires them after merging it
    parser.add_argument("positionals", nargs="*", metavar="IN.gguf [OUT.gguf] [TYPE] [THREADS]")
    return parser


def parse_quantize_args(argv: list[str]) -> argparse.Namespace:
    """The main command's arguments, a --config file's merged in under the command line's."""
    parser = build_quantize_parser()
    # intermixed: positionals may come between options (`IN OUT --target-size S 2`), as Python command lines allow
    args = parser.parse_intermixed_args(argv)
    if args.config is not None:
        args = parser.parse_intermixed_args(config_argv(parser, argv, args))
    if not args.positionals:
        parser.error("the following arguments are required: IN.gguf [OUT.gguf] [TYPE] [THREADS]")
    return args


@dataclass(frozen=True)
class Positionals:
    input_path: Path
    output_path: Path | None
    type_text: str | None
    threads: int | None


def parse_positionals(positionals: list[str], has_target: bool) -> Positionals:
    """IN [OUT] TYPE [THREADS] as llama-quantize reads them.

    With a target TYPE is optional, and a lone integer after IN (and OUT) is THREADS.
    """
    rest = list(positionals)
    usage = "IN.gguf [OUT.gguf] [TYPE] [THREADS]" if has_target else "IN.gguf [OUT.gguf] TYPE [THREADS]"
    if not 1 + (not has_target) <= len(rest) <= 4:
        raise BpwoptError(f"expected {usage}")
    input_path = Path(rest.pop(0))
    output_path = None
    if len(rest) == 3 or (rest and not _looks_like_type(rest[0]) and (has_target or len(rest) == 2)):
        output_path = Path(rest.pop(0))
    type_text = None
    if rest and not (has_target and len(rest) == 1 and rest[0].isdigit()):
        type_text = rest.pop(0)
    if type_text is None and not has_target:
        raise BpwoptError(f"expected {usage}")
    threads = None
    if rest:
        try:
            threads = int(rest.pop(0))
        except ValueError as error:
            raise BpwoptError(f"invalid THREADS {error.args[0]}") from error
    return Positionals(input_path, output_path, type_text, threads)


def _options_from_args(args: argparse.Namespace) -> QuantizeOptions:
    if args.include_weights and args.exclude_weights:
        raise BpwoptError("--include-weights and --exclude-weights cannot be used together")
    return QuantizeOptions(
        pure=args.pure,
        leave_output_tensor=args.leave_output_tensor,
        output_tensor_type=parse_ggml_type_name(args.output_tensor_type) if args.output_tensor_type else None,
        token_embedding_type=parse_ggml_type_name(args.token_embedding_type) if args.token_embedding_type else None,
        tensor_types=tuple(parse_tensor_type_option(text) for text in args.tensor_type),
        allow_requantize=args.allow_requantize,
        prune_layers=_prune_list(args.prune_layers),
        include_weights=tuple(args.include_weights),
        exclude_weights=tuple(args.exclude_weights),
        ignore=tuple(args.ignore),
        keep_split=args.keep_split,
    )


def _prune_list(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        layers = tuple(int(n) for n in text.split(","))
    except ValueError:
        layers = (-1,)
    if min(layers) < 0:  # llama-quantize's parse_layer_prune refuses what is not a layer number
        raise BpwoptError(f"invalid --prune-layers {text!r}; expected comma-separated layer numbers")
    return layers


def parse_candidates(text: str | None) -> tuple[GGMLQuantizationType, ...]:
    """--candidates Q3_K,Q4_K,…: types bpwopt has kernels for, case-insensitive."""
    if text is None:
        return DEFAULT_CANDIDATES
    chosen = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        ggml_type = parse_ggml_type_name(name)
        if ggml_type not in QUANT_TYPES:
            supported = ", ".join(t.name for t in QUANT_TYPES)
            raise BpwoptError(f"--candidates: bpwopt cannot produce {ggml_type.name}; supported: {supported}")
        chosen.append(ggml_type)
    if not chosen:
        raise BpwoptError("--candidates: give at least one type, e.g. Q4_K,Q6_K")
    return tuple(dict.fromkeys(chosen))


def _target_from_args(args: argparse.Namespace) -> Target | None:
    """The (first) budget; a --target-size list is a ladder, whose other rungs `_ladder` makes."""
    if args.target_bpw is None and args.target_size is None:
        return None
    if args.target_bpw is not None and args.target_size is not None:
        raise BpwoptError("give only one of --target-bpw and --target-size")
    if args.target_size is not None:
        return Target(file_bytes=parse_size(_ladder_sizes(args.target_size)[0]))
    return Target(bits_per_weight=args.target_bpw)


def _ladder_sizes(text: str) -> list[str]:
    """--target-size 2gb,3gb,4gb: the sizes as given, each once."""
    sizes = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not sizes:
        raise BpwoptError(f"invalid --target-size {text!r}: expected a size such as 1.5gb, or several: 2gb,3gb")
    return sizes


@contextmanager
def _ladder(job: OptimizeJob, args: argparse.Namespace) -> Iterator[list[OptimizeJob]]:
    """One job per size of a --target-size list, all measured into one state (a throwaway one if none was named).

    Each rung's file is OUT with the size as given appended to its name (OUT-2gb.gguf), or llama-quantize's
    default name for that size beside IN. A single size is the job itself.
    """
    sizes = _ladder_sizes(args.target_size) if args.target_size is not None else []
    if len(sizes) < 2:
        yield [job]
        return
    if job.options.keep_split:
        raise BpwoptError("--keep-split writes one model's shards; give one --target-size with it")
    with tempfile.TemporaryDirectory(prefix="bpwopt-ladder-") as scratch:
        state_path = job.state_path
        if state_path is None and not job.save_state:
            state_path = Path(scratch) / "ladder.bpw_state"
        rungs = []
        for size in sizes:
            target = Target(file_bytes=parse_size(size))
            output = None
            if job.output_path is not None:
                output = with_budget(job.output_path, size)
            elif not job.dry_run:
                output = default_output_path(job.input_path, target.file_label())
            rungs.append(replace(job, target=target, output_path=output, state_path=state_path))
        yield rungs


def _job_from_args(args: argparse.Namespace) -> QuantizeJob | OptimizeJob:
    target = _target_from_args(args)
    where = parse_positionals(args.positionals, has_target=target is not None)
    common = {
        "input_path": where.input_path,
        "output_path": where.output_path,
        "options": _options_from_args(args),
        "imatrix_path": args.imatrix,
        "overrides": dict(parse_override_kv(text) for text in args.override_kv),
        "rounding": args.rounding,
        "dry_run": args.dry_run,
        "progress": not args.quiet and not args.json,
    }
    if target is None:
        return QuantizeJob(type_text=where.type_text, **common)
    if not (math.isfinite(args.time_limit) and args.time_limit >= 0):
        raise BpwoptError(f"invalid --time-limit {args.time_limit}: expected a number of seconds, 0 or more")
    return OptimizeJob(
        target=target,
        type_text=where.type_text,
        candidates=parse_candidates(args.candidates),
        sampling=Sampling(max_rows=args.sample_rows, seed=args.seed, precise=args.precise, rse=args.sample_rse),
        ray_address=args.ray,
        state_path=args.state_file,
        save_state=args.save_state,
        objective=args.objective,
        ignore_importance=args.ignore_tensor_importance,
        time_limit=args.time_limit,
        compare_presets=True,
        **common,
    )


def _looks_like_type(text: str) -> bool:
    """Whether llama-quantize would read this positional as TYPE rather than OUT."""
    return text.upper() in PRESETS_BY_NAME or text.isdigit()


def _set_threads(threads: int | None) -> None:
    if threads:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def _quantize(args: argparse.Namespace) -> None:
    job = _job_from_args(args)
    _set_threads(args.threads or parse_positionals(args.positionals, has_target=isinstance(job, OptimizeJob)).threads)
    if isinstance(job, OptimizeJob):
        with _ladder(job, args) as rungs:
            summaries = [_optimize(rung, args) for rung in rungs]
        if args.json:
            print(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
        return
    report = quantize_file(job)
    log = sys.stderr
    print(f"bpwopt: {report.type_reading}", file=log)
    print(f"bpwopt: {report.plan.n_fallback} of {len(report.plan.tensors)} tensors required fallback types", file=log)
    print(
        f"bpwopt: model size {report.input_bytes / 2**20:.2f} MiB, quant size {report.output_data_bytes / 2**20:.2f} "
        f"MiB ({report.bits_per_weight:.2f} BPW)",
        file=log,
    )
    if report.output_path is not None:
        print(f"bpwopt: wrote {describe_written(report.output_path, report.shards, report.file_bytes)}", file=log)


def _optimize(job: OptimizeJob, args: argparse.Namespace) -> dict | None:
    """Solve (and write) one job; with --json its summary is returned instead of the plan printed."""
    checked = None
    if wants_check(args.check, job):
        output = job.output_path or default_output_path(job.input_path, job.target.file_label())
        checked = checked_optimize(replace(job, output_path=output), threads=args.threads)
        report = checked.plan
    else:
        report = optimize_file(job)
    if args.json:
        summary = report_as_dict(report)
        if checked is not None:
            summary["check"] = {
                "kept": checked.chosen, "candidates": [vars(c) for c in checked.candidates],
                "difference": checked.difference, "difference_stderr": checked.difference_stderr,
            }  # fmt: skip
        return summary
    print(format_plan(report, per_tensor=job.dry_run), file=sys.stdout if job.dry_run else sys.stderr)
    if checked is not None:
        print(format_check(checked), file=sys.stderr)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpwopt",
        description="Per-tensor quantization types for a GGUF model under a size or bpw budget.",
    )
    parser.add_argument("--version", action="version", version=f"bpwopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect", help="tensors, types, bytes and bits per weight of any GGUF, per layer and in total"
    )
    inspect.add_argument("file", help="a GGUF file")
    inspect.add_argument("--tensors", action="store_true", help="also list every tensor")
    inspect.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    inspect.set_defaults(run=_inspect)
    evaluation = commands.add_parser(
        "eval",
        help="KL divergence, same-top-token rate and perplexity of QUANT against BASE (llama.cpp runtime)",
        description="KL divergence of QUANT's token distributions against BASE's, as llama-perplexity "
        "--kl-divergence measures it; BASE's log-probabilities are cached on disk.",
    )
    evaluation.add_argument("base", type=Path, help="the unquantized (or reference) GGUF")
    evaluation.add_argument("quant", type=Path, help="the quantized GGUF")
    evaluation.add_argument("--text", type=Path, help="UTF-8 text file (default: bpwopt's evaluation text)")
    evaluation.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    evaluation.add_argument("--chunks", type=int, help="windows to evaluate (default: as many as the cache allows)")
    evaluation.add_argument("--threads", type=int, help="llama.cpp threads")
    evaluation.add_argument("--state-file", type=Path, help="also store the result in this state file")
    evaluation.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    evaluation.set_defaults(run=_evaluate)
    plot = commands.add_parser(
        "plot",
        help="plots of a state file: error/size trade-off, a plan's bits per layer and class, per-tensor errors",
        description="Draw the error/size trade-off the solver sees (llama.cpp presets, stored plans and measured "
        "KLD marked), a plan's bits per layer and tensor class, and every tensor's error against bpw. "
        "Writes tradeoff.*, plan-<ID>-bits.* and tensor-errors.* into DIR and prints their paths.",
    )
    plot.add_argument("state", type=Path, help="a state file (--state-file / --save-state)")
    plot.add_argument("--out", metavar="DIR", type=Path, default=Path("plots"), help="output folder (default: plots)")
    plot.add_argument("--plan", metavar="ID", type=int, help="the plan to draw (default: the newest)")
    plot.add_argument("--format", metavar="FMT,...", default="png,svg", help="png, svg or both (default: png,svg)")
    plot.add_argument(
        "--model", metavar="MODEL.gguf", type=Path,
        help="the model the state was measured from (checked by sha256): places llama.cpp's presets on the curve",
    )  # fmt: skip
    plot.add_argument("--objective", choices=OBJECTIVES, help="the error plotted (default: the plan's objective)")
    plot.set_defaults(run=_plot)
    calibration = commands.add_parser(
        "calibrate",
        help="measure per-group sensitivities (KLD per unit of the solver's error, calibration text); solves use them",
        description="For each group of tensors, quantize each of its tensors to its measured type nearest "
        f"{PROBE_BPW:g} bpw (--probe quant; or add Gaussian noise of relative error NOISE, --probe noise), "
        "measure the KL divergence against the unperturbed model on the calibration text (never the evaluation "
        "text), and store KLD / summed error in the state's sensitivities and weights tables. Later "
        "solves with --state-file weigh each tensor's relative error by its group's value unless "
        "--ignore-tensor-importance. Resumes a killed run (values are stored as they land).",
    )
    _add_model_and_state(calibration, "the unquantized GGUF the state was measured for")
    calibration.add_argument("--groups", choices=GROUPINGS, default=DEFAULT_GROUPING,
                             help="tensor groups (default: class-third = tensor class x third of the layers)")
    calibration.add_argument(
        "--probe", choices=PROBES, default=DEFAULT_PROBE,
        help=f"how a group is perturbed: quant = each tensor through its measured type nearest {PROBE_BPW:g} bpw "
        f"(sensitivity per unit of the {PROBE_OBJECTIVE} objective), noise = Gaussian noise of --noise relative "
        f"error (per unit of relative error) (default: {DEFAULT_PROBE})",
    )  # fmt: skip
    calibration.add_argument(
        "--noise", type=float, default=DEFAULT_NOISE,
        help=f"with --probe noise: relative error per tensor, rho^2 ({DEFAULT_NOISE:g})",
    )  # fmt: skip
    calibration.add_argument(
        "--chunks", type=int, default=DEFAULT_CHUNKS, help=f"text windows per group ({DEFAULT_CHUNKS})"
    )
    calibration.add_argument(
        "--ctx", type=int, default=CALIBRATION_CTX, help=f"window length in tokens ({CALIBRATION_CTX})"
    )
    calibration.add_argument("--only", metavar="KEY,...", help="calibrate only these group keys")
    calibration.add_argument("--seed", type=int, default=0, help="noise seed")
    calibration.add_argument("--fresh", action="store_true", help="discard stored sensitivities, do not resume")
    _add_run_options(calibration)
    calibration.set_defaults(run=_calibrate)
    tuning = commands.add_parser(
        "tune",
        help="fit per-class and depth factors of the objective to measured KLD (optuna); solves use them",
        description="Each trial gives every tensor class a factor and the blocks a depth factor, solves every "
        "budget with them, writes each plan and measures its KL divergence against MODEL on the calibration text "
        "(never the evaluation text); optuna minimizes the mean log KLD. Trial 0 is the untuned objective. The "
        "study is kept beside the state (STATE.optuna.db) and resumes; the best factors are stored in the state's "
        "tuned table, which later solves use unless --ignore-tensor-importance.",
    )
    _add_model_and_state(tuning, "the unquantized GGUF (measured into the state if not yet)")
    tuning.add_argument("--target-bpw", type=float, nargs="+", metavar="BPW", help="budgets to tune at, in bpw")
    tuning.add_argument("--target-size", nargs="+", metavar="SIZE", help="budgets to tune at, as file sizes")
    tuning.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                        help=f"completed trials the study should reach ({DEFAULT_TRIALS})")  # fmt: skip
    tuning.add_argument("--objective", choices=OBJECTIVES, help=OBJECTIVE_HELP)
    tuning.add_argument("--ctx", type=int, default=TUNE_CTX, help=f"window length in tokens ({TUNE_CTX})")
    tuning.add_argument("--chunks", type=int, default=TUNE_CHUNKS, help=f"windows per evaluation ({TUNE_CHUNKS})")
    tuning.add_argument("--seed", type=int, default=0, help="optuna sampler seed")
    tuning.add_argument("--allow-requantize", action="store_true", help="MODEL may be quantized (as for quantize)")
    tuning.add_argument("--candidates", metavar="T1,T2,...", help="as measured into the state (default: bpwopt's)")
    tuning.add_argument("--sample-rows", type=int, default=Sampling.max_rows, metavar="N",
                        help="as measured into the state")  # fmt: skip
    tuning.add_argument("--sample-rse", type=float, default=Sampling.rse, metavar="X",
                        help="as measured into the state")  # fmt: skip
    tuning.add_argument("--rounding", choices=ROUNDINGS, default=DEFAULT_ROUNDING, help="as measured into the state")
    _add_run_options(tuning)
    tuning.set_defaults(run=_tune)
    serving = commands.add_parser(
        "serve",
        help="a local web service: a JSON API over the models and state files under --root folders",
        description="Serve the models (GGUF files) and state files under the --root folders: list them, a state's "
        "trade-off curve, and the plan for any budget from a state alone (what --dry-run --json prints), at "
        "http://HOST:PORT/api/…, documented at /docs. On any address but loopback every request needs the token "
        "printed at start. No path outside the roots is read.",
    )
    serving.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serving.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    serving.add_argument("--root", type=Path, action="append", metavar="DIR",
                         help="a folder whose models and states are served; repeat for more (default: .)")  # fmt: skip
    serving.add_argument("--jobs-file", type=Path, metavar="FILE",
                         help=f"where the job list is kept across restarts (default: {JOURNAL_NAME} in the first "
                         "root); jobs a stop interrupted are resumed at the next start")  # fmt: skip
    serving.set_defaults(run=_serve)
    for command in commands.choices.values():
        command.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    return parser


def _add_model_and_state(parser: argparse.ArgumentParser, model_help: str) -> None:
    """MODEL, --state-file and --imatrix: what calibrate and tune work on."""
    parser.add_argument("model", type=Path, help=model_help)
    parser.add_argument("--state-file", type=Path, required=True, help="the state measured (or to measure) for MODEL")
    parser.add_argument("--imatrix", type=Path, help="the imatrix the state was measured with, if any")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="threads for quantizing and llama.cpp")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with sigterm_raises():
            if argv and argv[0] in SUBCOMMANDS:
                args = build_parser().parse_args(argv)
            else:
                args = parse_quantize_args(argv)  # a bad --config file is a BpwoptError, caught below
                args.run = _quantize
            args.run(args)
    except BpwoptError as error:
        print(f"bpwopt: error: {error}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as error:
        return _stopped(stopping_signal(error))
    except BrokenPipeError:
        # A reader such as `head` closed stdout early; that is not an error of ours.
        sys.stdout = None
        return 0
    except Exception as error:
        if stopping_signal(error) is not None:
            return _stopped(stopping_signal(error))
        if _debugging(argv):
            raise
        print(f"bpwopt: internal error: {_one_line(error)}; {_save_traceback(error)}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return 0


def _stopped(signum: signal.Signals) -> int:
    print(f"bpwopt: {STOPPED_BY[signum]}", file=sys.stderr)
    return 128 + signum


def _debugging(argv: list[str]) -> bool:
    """--debug anywhere before a `--`, or BPWOPT_DEBUG set to anything but empty or 0."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--debug" in options or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _one_line(error: Exception) -> str:
    """The exception, its first line of text, and the innermost line of bpwopt's own code it passed through."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [frame for frame in frames if f"{os.sep}bpwopt{os.sep}" in frame.filename] or frames
    where = ""
    if ours:
        frame = ours[-1]
        filename = frame.filename.rsplit(f"{os.sep}bpwopt{os.sep}", 1)[-1]
        where = f" in {frame.name} (bpwopt/{filename}:{frame.lineno})"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}{': ' + text[0] if text else ''}{where}"


def _save_traceback(error: Exception) -> str:
    """Write the full traceback under the cache folder; returns where it went, as the end of the message."""
    folder = cache_dir() / "crashes"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{stamp}-{os.getpid()}.txt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    except OSError as save_error:
        return f"could not save its traceback ({save_error.strerror}); rerun with --debug to see it"
    return f"traceback saved to {path} (rerun with --debug to see it)"

