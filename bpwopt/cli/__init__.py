"""The command line: argument parsing, config files and the subcommands."""

from bpwopt.cli.main import main

__all__ = ["main"]
