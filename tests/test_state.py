"""The state file: round trips, resume, refusals, durability after kill -9, the lock between processes."""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from bpwopt.errors import BpwoptError
from bpwopt.formats.files import file_sha256
from bpwopt.measure.records import Estimate
from bpwopt.state.store import (
    STATE_FORMAT_VERSION,
    Measurement,
    PlanRecord,
    StateFile,
    StateIdentity,
    TensorRecord,
    default_state_path,
    read_identity,
)

IDENTITY = StateIdentity(
    model_sha256="ab12" * 16,
    model_name="tiny",
    imatrix_sha256="cd34" * 16,
    candidates=("Q4_K", "Q6_K"),
    sampling="rows<=1024;seed=0",
)
REPO = Path(__file__).resolve().parents[1]


def tensor(name: str = "blk.0.attn_v.weight", layer: int | None = 0) -> TensorRecord:
    return TensorRecord(name, (256, 64), 256 * 64, "F16", "attn_v", layer, weight_energy=12.5, plain_energy=3.25)


def measurement(tensor_name: str = "blk.0.attn_v.weight", qtype: str = "Q4_K") -> Measurement:
    statistics = {"weighted_sse": Estimate(0.125, 0.01), "sse": Estimate(0.0625, 0.005)}
    return Measurement(tensor_name, qtype, 9216, statistics, rows_measured=32, rows_total=64, seconds=0.25)


# Root writes anywhere: dropping CAP_DAC_OVERRIDE makes the process obey file modes as a user's does.
_OBEY_FILE_MODES = """
import ctypes, os
if os.geteuid() == 0:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    caps = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) × two 32-bit words
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.capget(header, caps) == 0
    caps[0] &= ~(1 << 1)  # CAP_DAC_OVERRIDE
    assert libc.capset(header, caps) == 0, ctypes.get_errno()
"""


def run_python_as_a_user(code: str) -> subprocess.CompletedProcess:
    """run_python, with file modes obeyed even when the tests run as root."""
    return run_python(_OBEY_FILE_MODES + textwrap.dedent(code))


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run code in a fresh Python process (Popen when stdin=PIPE is asked for)."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if kwargs.get("stdin") == subprocess.PIPE:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, **kwargs)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.fixture
def state_path(tmp_path):
    return tmp_path / "tiny.bpw_state"


def test_tensors_and_measurements_round_trip(state_path):
    with StateFile.open(state_path, IDENTITY) as state:
        state.add_tensors([tensor(), tensor("output.weight", layer=None)])
        state.add_measurement(measurement())
        state.add_measurement(measurement(qtype="Q6_K"))
        assert state.tensors() == {"blk.0.attn_v.weight": tensor(), "output.weight": tensor("output.weight", None)}
        assert state.measurements() == {
            ("blk.0.attn_v.weight", "Q4_K"): measurement(),
            ("blk.0.attn_v.weight", "Q6_K"): measurement(qtype="Q6_K"),
        }
        assert state.identity == IDENTITY


def test_plans_evaluations_and_values_round_trip(state_path):
    plan = PlanRecord("bpw<=4.5", "relative", {"blk.0.attn_v.weight": "Q4_K"}, 0.5, 9216, 10_000, 4.5, 0.001)
    with StateFile.open(state_path, IDENTITY) as state:
        plan_id = state.add_plan(plan)
        evaluation_id = state.add_evaluation(plan_id, "out.gguf", {"kld_mean": 0.02, "ppl": 12.5}, "ef56" * 16)
        state.set_values("weights", {"attn_v": 2.0, "ffn_down@3": 0.5})
        [(stored_id, stored_plan)] = state.plans()
        assert (stored_id, stored_plan) == (plan_id, plan)
        assert stored_plan.created.endswith("+00:00")  # stamped in UTC by add_plan
        [evaluation] = state.evaluations()
        assert evaluation["id"] == evaluation_id
        assert evaluation["plan_id"] == plan_id
        assert evaluation["metrics"] == {"kld_mean": 0.02, "ppl": 12.5}
        assert state.values("weights") == {"attn_v": 2.0, "ffn_down@3": 0.5}
        assert state.values("sensitivities") == {}


def test_set_values_replaces_the_whole_table(state_path):
    with StateFile.open(state_path, IDENTITY) as state:
        state.set_values("sensitivities", {"attn_v": 1.0, "ffn_up": 2.0})
        state.set_values("sensitivities", {"ffn_up": 3.0})
        assert state.values("sensitivities") == {"ffn_up": 3.0}
        with pytest.raises(ValueError, match="sensitivities, weights"):
            state.values("plans")


def test_nan_errors_come_back_as_nan(state_path):
    with StateFile.open(state_path, IDENTITY) as state:
        state.add_tensors([tensor()])
        nan = {"weighted_sse": Estimate(math.nan, math.nan), "sse": Estimate(1.0, 0.0)}
        state.add_measurement(replace(measurement(), statistics=nan))
        assert math.isnan(state.measurements()[("blk.0.attn_v.weight", "Q4_K")].value("weighted_sse"))


def test_adding_a_tensor_again_is_harmless_but_a_conflicting_one_is_refused(state_path):
    with StateFile.open(state_path, IDENTITY) as state:
        state.add_tensors([tensor()])
        state.add_tensors([tensor()])
        assert len(state.tensors()) == 1
        with pytest.raises(BpwoptError, match=r"holds tensor blk.0.attn_v.weight as F16 \[256, 64\], not F32"):
            state.add_tensors([replace(tensor(), source_type="F32")])


def test_measurement_of_an_unknown_tensor_is_a_programming_error(state_path):
    with StateFile.open(state_path, IDENTITY) as state, pytest.raises(ValueError, match="add its TensorRecord first"):
        state.add_measurement(measurement())


def test_resume_finds_every_measurement(state_path):
    with StateFile.open(state_path, IDENTITY) as state:
        state.add_tensors([tensor()])
        state.add_measurement(measurement())
    with StateFile.open(state_path, IDENTITY, create=False) as state:
        assert state.measurements() == {("blk.0.attn_v.weight", "Q4_K"): measurement()}
    assert read_identity(state_path) == IDENTITY


def test_a_missing_state_is_created_with_its_directory_and_nothing_else(tmp_path):
    path = tmp_path / "state" / "tiny.bpw_state"
    with pytest.raises(BpwoptError, match="does not exist"):
        StateFile.open(path, IDENTITY, create=False)
    StateFile.open(path, IDENTITY).close()
    assert os.listdir(path.parent) == ["tiny.bpw_state"]  # no temporary file, no WAL left behind


def test_model_name_and_candidate_order_do_not_matter(state_path):
    StateFile.open(state_path, IDENTITY).close()
    renamed = replace(IDENTITY, model_name="tiny-renamed", candidates=("Q6_K", "Q4_K"))
    with StateFile.open(state_path, renamed) as state:
        assert state.identity == IDENTITY  # the stored one


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_sha256": "ee" * 32}, "was measured for another model (sha256 ab12ab12ab12… ≠ eeeeeeeeeeee…)"),
        ({"imatrix_sha256": "ff" * 32}, "was measured with another imatrix (sha256 cd34cd34cd34… ≠ ffffffffffff…)"),
        ({"imatrix_sha256": None}, "was measured with an imatrix (sha256 cd34cd34cd34…), this run has none"),
        ({"candidates": ("Q2_K", "Q4_K")}, "was measured with candidates Q4_K,Q6_K, not Q2_K,Q4_K"),
        ({"sampling": "precise"}, "was measured with sampling rows<=1024;seed=0, not precise"),
    ],
    ids=["model", "imatrix", "imatrix_dropped", "candidates", "sampling"],
)
def test_another_identity_is_refused_naming_what_differs(state_path, change, message):
    StateFile.open(state_path, IDENTITY).close()
    with pytest.raises(BpwoptError, match=re.escape(f"state file {state_path} {message}; use another state file")):
        StateFile.open(state_path, replace(IDENTITY, **change))


def test_a_state_measured_without_an_imatrix_is_refused_for_a_run_with_one(state_path):
    StateFile.open(state_path, replace(IDENTITY, imatrix_sha256=None)).close()
    with pytest.raises(BpwoptError, match="was measured without an imatrix"):
        StateFile.open(state_path, IDENTITY)


def test_a_state_of_a_newer_format_version_is_refused_untouched(state_path):
    StateFile.open(state_path, IDENTITY).close()
    newer = STATE_FORMAT_VERSION + 1
    with sqlite3.connect(state_path) as db:
        db.execute(f"UPDATE identity SET value = '{newer}' WHERE key = 'format_version'")
    db.close()
    before = state_path.read_bytes()
    message = rf"format version {newer} \(written by a newer bpwopt\), this bpwopt reads 1 to {STATE_FORMAT_VERSION}"
    with pytest.raises(BpwoptError, match=message):
        StateFile.open(state_path, IDENTITY)
    with pytest.raises(BpwoptError, match=message):
        read_identity(state_path)
    assert state_path.read_bytes() == before


FORMAT_1 = Path(__file__).parent / "data" / "state-format-1.bpw_state"  # written by the release before format 2


def test_a_format_1_state_is_migrated_on_open_and_keeps_everything(tmp_path):
    path = tmp_path / "old.bpw_state"
    path.write_bytes(FORMAT_1.read_bytes())
    identity = read_identity(path)
    assert identity == StateIdentity("ab" * 32, "tiny-llama", "cd" * 32, ("Q4_K", "Q8_0"), "rows<=1024;seed=0")
    with StateFile.open(path, identity) as state:
        assert sorted(state.tensors()) == ["blk.0.attn_v.weight", "blk.0.ffn_down.weight", "token_embd.weight"]
        assert state.tensors()["token_embd.weight"].layer is None
        measurements = state.measurements()
        assert len(measurements) == 6
        q4_k = measurements[("blk.0.ffn_down.weight", "Q4_K")]
        assert q4_k.statistics == {"weighted_sse": Estimate(0.1, 0.001), "sse": Estimate(0.05, 0.0005)}
        assert (q4_k.nbytes, q4_k.rows_measured, q4_k.rows_total) == (73728, 64, 1000)
        (plan_id, plan), = state.plans()
        assert plan.types["blk.0.attn_v.weight"] == "Q8_0" and plan.file_bytes == 240000
        assert state.evaluations()[0]["plan_id"] == plan_id
        assert state.evaluations()[0]["metrics"] == {"mean_kld": 0.0123, "mean_kld_stderr": 0.0004}
        assert state.values("weights") == {"attn_v@0-0": 2.0, "ffn_down": 0.5}
        state.add_measurement(replace(q4_k, qtype="Q6_K"))  # the migrated state takes new measurements
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (STATE_FORMAT_VERSION,)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert "weighted_sse" not in {row[1] for row in db.execute("PRAGMA table_info(measurements)")}
    db.close()
    with StateFile.open(path, identity) as state:  # and opens again as a current one
        assert len(state.measurements()) == 7


def test_a_format_1_state_in_a_read_only_file_is_refused_unmigrated(tmp_path):
    path = tmp_path / "old.bpw_state"
    path.write_bytes(FORMAT_1.read_bytes())
    path.chmod(0o444)
    attempt = run_python_as_a_user(f"""
        from bpwopt.errors import BpwoptError
        from bpwopt.state.store import StateFile, read_identity
        try:
            StateFile.open({str(path)!r}, read_identity({str(path)!r})).close()
            print("opened")
        except BpwoptError as error:
            print(error)
    """)
    assert attempt.stdout == (
        f"state file {path} is read-only and of format 1; open it once where it can be written, "
        f"to migrate it to format {STATE_FORMAT_VERSION}\n"
    ), attempt.stderr
    assert path.read_bytes() == FORMAT_1.read_bytes()


def _valid_state_bytes(path: Path) -> bytes:
    with StateFile.open(path, IDENTITY) as state:
        state.add_tensors(tensor(f"blk.{i}.attn_v.weight", i) for i in range(200))
    return path.read_bytes()


def _other_sqlite_bytes(path: Path) -> bytes:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE dogs (name TEXT)")
    db.close()
    return path.read_bytes()


@pytest.mark.parametrize(
    ("make_content", "reason"),
    [
        (lambda path: b"GGUF\x03\x00\x00\x00 definitely not SQLite" * 10, "not an SQLite database"),
        (lambda path: b"", "an empty file"),
        (lambda path: _valid_state_bytes(path)[:20_000], "damaged: database disk image is malformed"),
        (_other_sqlite_bytes, "an SQLite database of another program"),
    ],
    ids=["garbage", "empty", "truncated_state", "other_sqlite"],
)
def test_what_is_not_a_state_file_is_refused_and_left_untouched(tmp_path, make_content, reason):
    path = tmp_path / "x.bpw_state"
    content = make_content(tmp_path / "source.db")
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    path.write_bytes(content)
    for attempt in (lambda: StateFile.open(path, IDENTITY), lambda: read_identity(path)):
        with pytest.raises(BpwoptError, match=rf"^{path} is not a bpwopt state file \({reason}"):
            attempt()
    assert path.read_bytes() == content
    assert os.listdir(tmp_path) == ["x.bpw_state"]


def test_a_directory_is_not_a_state_file(tmp_path):
    with pytest.raises(BpwoptError, match="is a directory, not a state file"):
        StateFile.open(tmp_path, IDENTITY)


@pytest.mark.slow  # a kill test
def test_measurements_survive_kill_9_right_after_they_are_added(state_path):
    killed = run_python(f"""
        import os, signal
        from bpwopt.measure.records import Estimate
        from bpwopt.state.store import Measurement, StateFile, StateIdentity, TensorRecord
        state = StateFile.open({str(state_path)!r}, {IDENTITY!r})
        state.add_tensors([TensorRecord(f"t{{i}}", (256,), 256, "F32", "other", None, 1.0, 1.0) for i in range(10)])
        for i in range(40):
            stats = {{"weighted_sse": Estimate(1.0, 0.0), "sse": Estimate(1.0, 0.0)}}
            state.add_measurement(Measurement(f"t{{i % 10}}", f"Q{{i // 10}}", i, stats, 1, 1, 0.0))
        print(40, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert (killed.returncode, killed.stdout) == (-signal.SIGKILL, "40\n"), killed.stderr
    assert Path(f"{state_path}-wal").stat().st_size > 0  # the commits sit in the WAL, not yet in the file
    with sqlite3.connect(state_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()
    with StateFile.open(state_path, IDENTITY) as state:  # the dead process's lock is gone with it
        assert sorted(m.nbytes for m in state.measurements().values()) == list(range(40))


def test_a_second_process_is_refused_while_the_state_is_open(state_path):
    StateFile.open(state_path, IDENTITY).close()
    holder = run_python(
        f"""
        import sys
        from bpwopt.state.store import StateFile, StateIdentity
        with StateFile.open({str(state_path)!r}, {IDENTITY!r}):
            print("open", flush=True)
            sys.stdin.readline()
        """,
        stdin=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(BpwoptError, match=rf"^state file {state_path} is in use by another bpwopt process$"):
            StateFile.open(state_path, IDENTITY)
        assert read_identity(state_path) == IDENTITY  # reading the identity needs no lock
        holder.communicate("\n", timeout=30)
    finally:
        holder.kill()
    StateFile.open(state_path, IDENTITY).close()


def test_a_read_only_directory_refuses_new_states_and_opens_an_existing_one_read_only(tmp_path):
    existing = tmp_path / "existing.bpw_state"
    StateFile.open(existing, IDENTITY).close()
    tmp_path.chmod(0o555)
    try:
        attempt = run_python_as_a_user(f"""
            import os
            from bpwopt.errors import BpwoptError
            from bpwopt.state.store import StateFile, StateIdentity
            for name in ("new.bpw_state", "sub/new.bpw_state", "existing.bpw_state"):
                try:
                    with StateFile.open(os.path.join({str(tmp_path)!r}, name), {IDENTITY!r}) as state:
                        print("opened", name, "read-only" if state.read_only else "")
                        state.add_tensors([])
                except BpwoptError as error:
                    print(error)
        """)
    finally:
        tmp_path.chmod(0o755)
    assert attempt.stdout.splitlines() == [
        f"cannot create state file {tmp_path}/new.bpw_state: Permission denied",
        f"cannot create state file {tmp_path}/sub/new.bpw_state: Permission denied",
        "opened existing.bpw_state read-only",
        f"state file {tmp_path}/existing.bpw_state is read-only: nothing new can be stored in it",
    ], attempt.stderr
    assert sorted(os.listdir(tmp_path)) == ["existing.bpw_state"]


def test_default_state_path_is_filesystem_safe():
    sha = "0123456789abcdef" + "9" * 48
    assert default_state_path("SmolLM2 135M Instruct", sha) == Path(
        "state/SmolLM2_135M_Instruct-0123456789abcdef-mse.bpw_state"
    )
    assert default_state_path("../../etc/passwd", sha, Path("/tmp/s")) == Path(
        "/tmp/s/etc_passwd-0123456789abcdef-mse.bpw_state"
    )
    assert default_state_path("", sha).name == "model-0123456789abcdef-mse.bpw_state"


def test_file_sha256_streams_the_whole_file(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(2_500_000)  # more than two 1 MiB chunks
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(BpwoptError, match="cannot read"):
        file_sha256(tmp_path / "missing")
