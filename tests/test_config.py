"""`--config FILE`: a TOML or YAML file gives the same job as the command line, and the command line wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType

from bpwopt.cli.main import _job_from_args, build_quantize_parser, main, parse_quantize_args
from bpwopt.errors import BpwoptError

TOML = """\
# the job of COMMAND_LINE below
input = "in.gguf"
output = "out.gguf"
type = "Q4_K_M"
allow-requantize = true
pure = false
imatrix = "imatrix.gguf"
tensor-type = ["attn_q=q8_0", "ffn_down=q6_k"]
ignore = "^output"
override-kv = ["general.name=str:tiny", "llama.context_length=int:64"]
target_size = "1.5gb"
candidates = "Q4_K,Q6_K"
objective = "relative"
sample-rows = 512
seed = 3
time-limit = 2.5
dry-run = true
"""
YAML = """\
# the job of COMMAND_LINE below
input: in.gguf
output: out.gguf
type: Q4_K_M
allow-requantize: true
pure: false
imatrix: imatrix.gguf
tensor-type: [attn_q=q8_0, ffn_down=q6_k]
ignore: ^output
override-kv:
  - general.name=str:tiny
  - llama.context_length=int:64
target_size: 1.5gb
candidates: Q4_K,Q6_K
objective: relative
sample-rows: 512
seed: 3
time-limit: 2.5
dry-run: true
"""
COMMAND_LINE = [
    "--allow-requantize", "--imatrix", "imatrix.gguf", "--tensor-type", "attn_q=q8_0", "--tensor-type",
    "ffn_down=q6_k", "--ignore", "^output", "--override-kv", "general.name=str:tiny", "--override-kv",
    "llama.context_length=int:64", "--target-size", "1.5gb", "--candidates", "Q4_K,Q6_K", "--objective", "relative",
    "--sample-rows", "512", "--seed", "3", "--time-limit", "2.5", "--dry-run", "in.gguf", "out.gguf", "Q4_K_M",
]  # fmt: skip


def job(*argv):
    return _job_from_args(parse_quantize_args([str(a) for a in argv]))


def config(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "text"), [("job.toml", TOML), ("job.yaml", YAML), ("job.yml", YAML)])
def test_a_config_gives_the_job_of_the_same_command_line(tmp_path, name, text):
    assert job("--config", config(tmp_path, text, name)) == job(*COMMAND_LINE)


def test_a_single_valued_option_on_the_command_line_wins(tmp_path):
    path = config(tmp_path, TOML)
    assert job("--config", path, "--target-size", "2gb", "--seed", "9") == job(
        *COMMAND_LINE, "--target-size", "2gb", "--seed", "9"
    )
    assert job("--target-size", "2gb", "--config", path).target.file_bytes == 2 * 10**9  # wherever it stands


def test_a_repeatable_option_on_the_command_line_replaces_the_files_list(tmp_path):
    path = config(tmp_path, TOML)
    replaced = job("--config", path, "--tensor-type", "attn_v=q5_k")
    assert replaced.options.tensor_types == (("attn_v", GGMLQuantizationType.Q5_K),)
    assert replaced.options.ignore == ("^output",)  # other lists stay the file's
    assert set(replaced.overrides) == {"general.name", "llama.context_length"}


def test_positionals_on_the_command_line_replace_input_output_and_type_together(tmp_path):
    path = config(tmp_path, TOML)
    assert (job("--config", path, "other.gguf").input_path, job("--config", path, "other.gguf").output_path) == (
        Path("other.gguf"),
        None,
    )
    assert job("--config", path, "other.gguf").type_text is None  # with a target, TYPE is optional


def test_flags_true_are_given_false_are_absent_and_the_command_line_adds_its_own(tmp_path):
    path = config(tmp_path, "pure = false\nleave-output-tensor = true\n", "flags.toml")
    options = job("--config", path, "in.gguf", "Q4_0").options
    assert (options.pure, options.leave_output_tensor) == (False, True)
    assert job("--config", path, "--pure", "in.gguf", "Q4_0").options.pure


def test_every_long_option_of_the_parser_is_a_key(tmp_path):
    """The keys come from the parser: an option added there is configurable without anything else."""
    parser = build_quantize_parser()
    names = {s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")}
    for name in sorted(names - {"help", "version", "config"}):
        try:
            parse_quantize_args(["--config", str(config(tmp_path, f"{name} = 1\n")), "in.gguf", "Q4_0"])
        except BpwoptError as error:  # 1 is a wrong value for some options, but never an unknown key
            assert "unknown key" not in str(error), name


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.toml", "target-sise = '1gb'\n", "unknown key 'target-sise'; did you mean 'target-size'?"),
        ("a.toml", "seed = 1\ndry-run = \n", "invalid TOML: Invalid value (at line 2, column 11)"),
        ("a.yaml", "seed: 1\ntensor-type: [a=q4_0\n", "invalid YAML at line 3"),
        ("a.yaml", "dry-run: yes please\n", "dry-run: expected true or false, not a string"),
        ("a.yaml", "target-bpw: [4, 5]\n", "target-bpw: expected one value, not a list"),
        ("a.yaml", "ignore: [[a]]\n", "ignore: expected a string or a number, not a list"),
        ("a.yaml", "imatrix: {path: x}\n", "imatrix: expected a string or a number, not a table"),
        ("a.toml", "objective = 'best'\n", "objective: 'best' is not one of wsse, relative, per-weight"),
        ("a.toml", "sample-rows = 'many'\n", "sample-rows: invalid value 'many'"),
        ("a.toml", "config = 'b.toml'\n", "a config cannot name another config"),
        ("a.toml", "dry-run = true\ndry_run = true\n", "given twice"),
        ("a.ini", "dry-run = true\n", "unknown format; name it .toml, .yaml or .yml"),
        ("a.yaml", "ignore: [&s " + "x" * 1000 + ", " + "*s, " * 1100 + "]\n", "add up to more than 1 MiB"),
        ("a.toml", "# " + "x" * (1 << 20) + "\n", "larger than 1 MiB"),
    ],
    ids=lambda value: value[:24],
)
def test_a_bad_config_is_one_line_naming_the_file_and_the_problem(tmp_path, capsys, name, text, message):
    path = config(tmp_path, text, name)
    assert main(["--config", str(path), "in.gguf", "Q4_0"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"bpwopt: error: config {path}") and message in error and error.count("\n") == 1


@pytest.mark.slow  # measures and solves the demo model
def test_a_dry_run_with_json_from_a_config(demo_model_path, tmp_path, capsys):
    path = config(
        tmp_path,
        f"input = {json.dumps(str(demo_model_path))}\nallow-requantize = true\ntarget-bpw = 5.5\n"
        "candidates = 'Q4_K,Q6_K'\nsample-rows = 64\ndry-run = true\njson = true\nquiet = true\n",
    )
    assert main(["--config", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"] == "bpw<=5.5" and 5.49 <= summary["bits_per_weight"] <= 5.5
    assert {"Q4_K", "Q6_K"} & {tensor["qtype"] for tensor in summary["tensors"]}
    assert summary["written"] is False and not list(tmp_path.glob("*.gguf"))


def test_help_gives_every_subcommand_a_line_of_its_own():
    from bpwopt.cli.main import SUBCOMMANDS

    description = build_quantize_parser().format_help()
    for name in SUBCOMMANDS:
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in description.splitlines()), name
