"""Command line: parses arguments, calls the pipeline functions, prints.

No algorithm lives here. A BpwoptError (something the user can fix) becomes
one line on stderr and exit status 1; argparse's own usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numba
from gguf import GGUFValueType

from bpwopt import __version__
from bpwopt.errors import BpwoptError
from bpwopt.inspector import format_summary, inspect_gguf, summary_as_dict
from bpwopt.pipeline import QuantizeJob, quantize_file
from bpwopt.policy import QuantizeOptions, parse_tensor_type_option
from bpwopt.presets import PRESETS_BY_NAME, format_presets_help, parse_ggml_type_name

SUBCOMMANDS = ("inspect",)
_OVERRIDE_TYPES = {
    "int": (GGUFValueType.UINT32, lambda text: abs(int(text))),  # llama.cpp writes ints as u32
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


def parse_override_kv(text: str) -> tuple[str, tuple[GGUFValueType, object]]:
    """--override-kv KEY=TYPE:VALUE, TYPE one of int, float, bool, str (llama.cpp's spelling)."""
    key, _, rest = text.partition("=")
    kind, _, value = rest.partition(":")
    if not key or kind not in _OVERRIDE_TYPES:
        raise BpwoptError(f"--override-kv {text!r}: expected KEY=TYPE:VALUE with TYPE one of int, float, bool, str")
    value_type, convert = _OVERRIDE_TYPES[kind]
    try:
        return key, (value_type, convert(value))
    except (ValueError, KeyError) as error:
        raise BpwoptError(f"--override-kv {text!r}: {value!r} is not a valid {kind}") from error


def build_quantize_parser() -> argparse.ArgumentParser:
    """llama-quantize's command line, same spellings and meanings."""
    parser = argparse.ArgumentParser(
        prog="bpwopt",
        usage="bpwopt [options] IN.gguf [OUT.gguf] TYPE [THREADS]\n       bpwopt inspect FILE",
        description="Quantize a GGUF model as llama-quantize does (drop-in). Subcommands: inspect.",
        epilog="TYPE (name or number):\n" + format_presets_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bpwopt {__version__}")
    add = parser.add_argument
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
    add("--prune-layers", metavar="L0,L1,...", help="remove these layers (not supported yet)")
    add("--keep-split", action="store_true", help="write shards like the input (not supported yet)")
    add("--dry-run", action="store_true", help="print the sizes, write nothing")
    add("--quiet", action="store_true", help="no progress bar")
    add("positionals", nargs="+", metavar="IN.gguf [OUT.gguf] TYPE [THREADS]")
    return parser


def _job_from_args(args: argparse.Namespace) -> QuantizeJob:
    positionals = list(args.positionals)
    if len(positionals) < 2 or len(positionals) > 4:
        raise BpwoptError("expected IN.gguf [OUT.gguf] TYPE [THREADS]")
    if args.keep_split:
        raise BpwoptError("--keep-split is not supported by bpwopt yet")
    input_path = Path(positionals.pop(0))
    threads = None
    output_path = None
    if len(positionals) == 3 or (len(positionals) == 2 and not _looks_like_type(positionals[0])):
        output_path = Path(positionals.pop(0))
    type_text = positionals.pop(0)
    if positionals:
        try:
            threads = int(positionals.pop(0))
        except ValueError as error:
            raise BpwoptError(f"invalid THREADS {error.args[0]}") from error
    options = QuantizeOptions(
        pure=args.pure,
        leave_output_tensor=args.leave_output_tensor,
        output_tensor_type=parse_ggml_type_name(args.output_tensor_type) if args.output_tensor_type else None,
        token_embedding_type=parse_ggml_type_name(args.token_embedding_type) if args.token_embedding_type else None,
        tensor_types=tuple(parse_tensor_type_option(text) for text in args.tensor_type),
        allow_requantize=args.allow_requantize,
        prune_layers=tuple(int(n) for n in args.prune_layers.split(",")) if args.prune_layers else (),
        include_weights=tuple(args.include_weights),
        exclude_weights=tuple(args.exclude_weights),
    )
    return QuantizeJob(
        input_path=input_path,
        output_path=output_path,
        type_text=type_text,
        options=options,
        imatrix_path=args.imatrix,
        overrides=dict(parse_override_kv(text) for text in args.override_kv),
        threads=threads,
        dry_run=args.dry_run,
        progress=not args.quiet,
    )


def _looks_like_type(text: str) -> bool:
    """Whether llama-quantize would read this positional as TYPE rather than OUT."""
    return text.upper() in PRESETS_BY_NAME or text.isdigit()


def _quantize(args: argparse.Namespace) -> None:
    if args.include_weights and args.exclude_weights:
        raise BpwoptError("--include-weights and --exclude-weights cannot be used together")
    job = _job_from_args(args)
    if job.threads:
        numba.set_num_threads(max(1, min(job.threads, numba.config.NUMBA_NUM_THREADS)))
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
        print(f"bpwopt: wrote {report.output_path} ({report.file_bytes:,} bytes)", file=log)


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
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        args = build_parser().parse_args(argv)
    else:
        args = build_quantize_parser().parse_args(argv)
        args.run = _quantize
    try:
        args.run(args)
    except BpwoptError as error:
        print(f"bpwopt: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bpwopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # A reader such as `head` closed stdout early; that is not an error of ours.
        sys.stdout = None
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
