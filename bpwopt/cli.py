"""Command line: parses arguments, calls the pipeline functions, prints.

No algorithm lives here. A BpwoptError (something the user can fix) becomes
one line on stderr and exit status 1; argparse's own usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from bpwopt import __version__
from bpwopt.errors import BpwoptError
from bpwopt.inspector import format_summary, inspect_gguf, summary_as_dict


def _inspect(args: argparse.Namespace) -> None:
    summary = inspect_gguf(args.file)
    if args.json:
        print(json.dumps(summary_as_dict(summary), indent=2))
    else:
        print(format_summary(summary, per_tensor=args.tensors))


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
    args = build_parser().parse_args(argv)
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
