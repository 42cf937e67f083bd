"""`--config FILE`: a TOML or YAML file of options, turned into command-line tokens before argparse runs.

It sits in front of the main command's parser. The file's keys are that parser's long option names
(`target-size`, `tensor-type`, `allow-requantize`, with `-` or `_`) plus `input`, `output` and `type`
for IN.gguf, OUT.gguf and TYPE; THREADS is the `threads` option. The file's tokens go before the
command line's, so argparse itself applies the precedence: a single-valued option given on the
command line wins because its token comes later; a repeatable option given there replaces the
file's list (the file's tokens for it are dropped); positionals given there replace `input`,
`output` and `type` together, because llama-quantize's positionals are read by position and a mix
of the two could not be read unambiguously. Which keys exist, which are flags and which repeat,
and how a value is checked all come from the parser's own actions, so a new option is
configurable without a second table here.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import yaml

from bpwopt.errors import BpwoptError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

MAX_CONFIG_BYTES = 1 << 20  # a config is a few lines: refuse more before any parser sees it
FORMATS = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}  # chosen by extension, never guessed
MAX_YAML_DEPTH = 16  # a valid config is 2 deep (a mapping of lists)
POSITIONAL_KEYS = ("input", "output", "type")  # in the order llama-quantize reads IN [OUT] [TYPE]
_NOT_CONFIGURABLE = ("help", "version", "config")


def load_config(path: Path) -> dict[str, object]:
    """The top-level mapping of a .toml, .yaml or .yml file; BpwoptError (one line) for anything else."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise BpwoptError(f"config {path}: unknown format; name it .toml, .yaml or .yml")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)  # never more, whatever the file claims to be
    except OSError as error:
        raise BpwoptError(f"cannot read config {path}: {error.strerror or error}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise BpwoptError(f"config {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few lines")
    try:
        text = data.decode("utf-8-sig")  # an editor's byte-order mark is harmless
    except UnicodeDecodeError as error:
        raise BpwoptError(f"config {path} is not UTF-8 text (byte {error.start})") from None
    try:
        values = tomllib.loads(text) if kind == "TOML" else _load_yaml(text)
    except RecursionError:  # tomllib recurses once per level of nesting
        raise BpwoptError(f"config {path}: nested too deeply") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}" if mark else ""
        raise BpwoptError(f"config {path}: invalid YAML{where}: {_one_line(error.problem or error)}") from None
    except (yaml.YAMLError, ValueError) as error:  # TOMLDecodeError is a ValueError and names its line
        raise BpwoptError(f"config {path}: invalid {kind}: {_one_line(error)}") from None
    if values is None:  # an empty YAML file
        return {}
    if not isinstance(values, dict):
        raise BpwoptError(f"config {path}: expected option names and values, not {_kind(values)}")
    return values


def _load_yaml(text: str) -> object:
    """yaml.safe_load, with nesting past MAX_YAML_DEPTH refused before anything is built.

    Unchecked, deep flow nesting is costly either way: libyaml's composer recurses on the C stack
    (a crash), PyYAML's pure-Python scanner takes time quadratic in the depth. The first pass reads
    only the parser's events (libyaml's is a loop, not a recursion) and stops at the first level too
    many. Aliases are shared, never copied, when the values are built.
    """
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
        if depth > MAX_YAML_DEPTH:
            raise RecursionError
    return yaml.load(text, Loader=loader)


def config_argv(parser: argparse.ArgumentParser, argv: list[str], given: argparse.Namespace) -> list[str]:
    """argv with the options of the config file `given.config` merged in, the command line taking precedence.

    given is parser.parse_args(argv), the command line alone: it tells which repeatable options and
    positionals the command line already has.
    """
    path = Path(given.config)
    actions = _configurable(parser)
    valid_keys = [*actions, *POSITIONAL_KEYS]
    options: list[str] = []
    positionals: dict[str, str] = {}
    seen: dict[str, str] = {}
    total_chars = 0
    for key, value in load_config(path).items():
        if not isinstance(key, str):
            raise BpwoptError(f"config {path}: key {_shown(key)} is not an option name")
        name = key.replace("_", "-")
        where = f"config {path}: {key}"
        if name == "config":
            raise BpwoptError(f"{where}: a config cannot name another config")
        if name not in valid_keys:
            close = difflib.get_close_matches(name, valid_keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BpwoptError(f"config {path}: unknown key {_shown(key)}{hint}")
        if name in seen:
            raise BpwoptError(f"{where}: given twice (also as {seen[name]!r})")
        seen[name] = key
        if name in POSITIONAL_KEYS:
            positionals[name] = _scalar_text(where, value)
            continue
        action = actions[name]
        flag = action.option_strings[-1]
        if action.nargs == 0:  # store_true: the flag is there or it is not
            if not isinstance(value, bool):
                raise BpwoptError(f"{where}: expected true or false, not {_kind(value)}")
            options += [flag] if value else []
            continue
        repeatable = isinstance(action, argparse._AppendAction)
        if isinstance(value, list) and not repeatable:
            raise BpwoptError(f"{where}: expected one value, not a list (only repeatable options take lists)")
        texts = [_scalar_text(where, item) for item in (value if isinstance(value, list) else [value])]
        total_chars += sum(map(len, texts))
        if total_chars > MAX_CONFIG_BYTES:  # only YAML aliases repeating one value get here
            raise BpwoptError(f"config {path}: its values add up to more than {MAX_CONFIG_BYTES >> 20} MiB")
        for text in texts:
            _check_value(where, action, text)
        if not (repeatable and getattr(given, action.dest)):  # else the command line's list replaces the file's
            options += [f"{flag}={text}" for text in texts]  # `=`: a value that starts with '-' stays a value
    if given.positionals or not positionals:
        return [*options, *argv]
    if "input" not in positionals:
        raise BpwoptError(f"config {path}: {', '.join(positionals)} without input")
    tail = [positionals[key] for key in POSITIONAL_KEYS if key in positionals]
    return [*options, *argv, *([] if "--" in argv else ["--"]), *tail]  # after --: a path may start with '-'


def _configurable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name without dashes -> its action, for every option a config may set."""
    actions = {}
    for action in parser._actions:
        long_names = [s for s in action.option_strings if s.startswith("--")]
        if long_names and action.dest not in _NOT_CONFIGURABLE:
            actions[long_names[-1][2:]] = action
    return actions


def _check_value(where: str, action: argparse.Action, text: str) -> None:
    """The parser's own type and choices, applied here so that a bad value names the file and key."""
    try:
        value = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise BpwoptError(f"{where}: invalid value {_shown(text)}") from None
    if action.choices is not None and value not in action.choices:
        raise BpwoptError(f"{where}: {_shown(text)} is not one of {', '.join(map(str, action.choices))}")


def _scalar_text(where: str, value: object) -> str:
    """A string or a number as the command line would spell it; anything else is refused."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BpwoptError(f"{where}: expected a string or a number, not {_kind(value)}")
    return value if isinstance(value, str) else repr(value)


def _kind(value: object) -> str:
    """What a value is, in words; never its contents, which a YAML alias can make enormous."""
    kinds = {dict: "a table", list: "a list", bool: "a boolean", type(None): "null", str: "a string", int: "a number"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, str | int | float) else _kind(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(error: object) -> str:
    return " ".join(str(error).split())[:300]
