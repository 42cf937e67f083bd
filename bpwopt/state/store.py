"""The resumable state file: one measurement run's identity, tensors, measurements, plans and later results.

The measure stage writes every (tensor, type) measurement into it the moment
that measurement exists, so a run killed at any point (even by `kill -9`)
resumes where it stopped; the solve stage reads the measurements and adds
each plan it makes; `bpwopt eval` and `bpwopt tune` add evaluations,
sensitivities and tuned per-group weights that later solves read back. A
state is reusable only for the run that made it: its `StateIdentity` (model
hash, imatrix hash, candidate types, sampling, format version) is stored in
the file and an open with any other identity is refused with a message that
names what differs. The file is SQLite (through sqlite-utils), one writer at a
time, guarded by an advisory lock. Its format version is stored in it; a file
of an older format is migrated forward, in one transaction, when it is opened
for writing (`_MIGRATIONS`), and one of a newer format is refused.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlite_utils import Database

from bpwopt.errors import BpwoptError
from bpwopt.formats.files import fsync_path
from bpwopt.formats.output_paths import state_file_path
from bpwopt.measure.records import Estimate, Measurement, TensorRecord
from bpwopt.quant.types import DEFAULT_ROUNDING

# 1: statistics as columns of measurements; 2: a statistics table, one row per (tensor, type, statistic)
STATE_FORMAT_VERSION = 2
VALUE_TABLES = ("sensitivities", "weights", "tuned")

# PRAGMA application_id marks the file as ours in SQLite's header (offset 68), so a
# foreign SQLite database is told apart before any of its tables is read.
_APPLICATION_ID = 0x62707773  # "bpws"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_BYTES = 100
# Every state of a format version has these; "tuned" came later and is created on its first write.
_TABLES = ("identity", "tensors", "measurements", "plans", "evaluations", "sensitivities", "weights")
_TABLES_OF_VERSION = {1: _TABLES, 2: (*_TABLES, "statistics")}
_HASH_SHOWN = 12  # hex digits of a sha256 quoted in messages


@dataclass(frozen=True)
class StateIdentity:
    """What makes measurements reusable: a state with a different identity is refused.

    model_name is kept for display and file names only; the model is identified by its hash.
    """

    model_sha256: str
    model_name: str
    imatrix_sha256: str | None  # None: measured without an imatrix
    candidates: tuple[str, ...]  # candidate type names as requested, e.g. ("Q2_K", "Q3_K", ...)
    sampling: str  # canonical text of the sampling settings, e.g. "rows<=1024;seed=0" or "precise"
    rounding: str = DEFAULT_ROUNDING  # the quantizers measured (and written): a name in bpwopt.quant.types.ROUNDINGS


@dataclass(frozen=True)
class PlanRecord:
    """A solved plan: one type per tensor and what the solver predicted for it."""

    target: str  # e.g. "size<=150000000" or "bpw<=4.5"
    objective: str  # name of the objective minimized
    types: dict[str, str]  # tensor name -> chosen type name
    predicted_error: float  # objective value of the plan
    total_bytes: int  # bytes of all tensor data
    file_bytes: int  # bytes of the whole GGUF file
    bits_per_weight: float
    gap: float  # remaining relative optimality gap of the solve
    created: str = field(default="", compare=False)  # ISO 8601 UTC, filled in by add_plan


class StateFile:
    """An open state file, held exclusively by this process until close()."""

    path: Path
    identity: StateIdentity

    def __init__(self, path: Path, identity: StateIdentity, db: Database, lock_fd: int, read_only: bool) -> None:
        """Use StateFile.open(); this only wraps an already validated, locked database."""
        self.path = path
        self.identity = identity
        self.read_only = read_only  # on storage this process cannot write: every add_* / set_* is refused
        self._db = db
        self._lock_fd: int | None = lock_fd

    @classmethod
    def open(cls, path: str | os.PathLike, identity: StateIdentity, *, create: bool = True) -> StateFile:
        """Open the state at path for this identity, creating it (and its directory) if missing and create is set.

        Refused with BpwoptError: a file that is not a bpwopt state (never modified), a state of
        another identity or of a newer format, a state another process holds open, a device,
        FIFO or directory at path. A symbolic link is followed (SQLite's -wal and -shm files then
        sit beside the state itself). A state of an older format is migrated to this one.

        A state this process cannot write (the file or its directory read-only: a shared or
        archived measurement) is opened read-only: everything stored in it can be read and
        solved again, and storing anything is refused (`read_only`). It cannot be migrated
        there, nor read past a -wal file a killed run left beside it.
        """
        path = state_file_path(path)  # a link's target; a device, FIFO or directory refused
        if not path.exists():
            if not create:
                raise BpwoptError(f"state file {path} does not exist")
            _create(path, identity)
        lock_fd = _lock(path)
        db = None
        try:
            _check_header(path, os.pread(lock_fd, _HEADER_BYTES, 0))
            read_only = not (_writable(path) and _writable(path.parent))
            if read_only:
                _check_nothing_unwritten(path)
            with _sqlite_errors(path, "open"):
                db = _database(_connect(path, read_only))
                db.execute("PRAGMA busy_timeout = 10000")
                # Each measurement is its own WAL transaction. synchronous=NORMAL skips the fsync at commit:
                # a commit is in the WAL (the OS's page cache) when add_measurement returns, so it survives the
                # process being killed, kill -9 included, and the file stays consistent even on power loss.
                # Only an OS crash or power cut can roll back the last few commits, and those few measurements
                # are simply measured again on resume. FULL would fsync once per measurement for that case alone.
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute("PRAGMA foreign_keys = ON")
                stored, version = _validated_identity(path, db)
            _check_identity(path, stored, identity)
            if read_only and version < STATE_FORMAT_VERSION:
                raise BpwoptError(
                    f"state file {path} is read-only and of format {version}; open it once where it can be "
                    f"written, to migrate it to format {STATE_FORMAT_VERSION}"
                )
            with _sqlite_errors(path, "migrate"):
                _migrate(db, version)
        except BaseException:
            # The connection first: closing our descriptor of the file would drop SQLite's POSIX locks on it.
            if db is not None:
                db.close()
            os.close(lock_fd)
            raise
        return cls(path, stored, db, lock_fd, read_only)

    def add_tensors(self, records: Iterable[TensorRecord]) -> None:
        """Record tensors; a name already present must agree on shape, elements and source type (then it is kept)."""
        with self._writing(), self._db.atomic():
            for record in records:
                rows = list(self._db["tensors"].rows_where("name = ?", [record.name]))
                old = _tensor_record(rows[0]) if rows else None
                if old is None:
                    self._db["tensors"].insert(_tensor_row(record))
                elif (old.shape, old.elements, old.source_type) != (
                    tuple(record.shape),
                    record.elements,
                    record.source_type,
                ):
                    raise BpwoptError(
                        f"state file {self.path} holds tensor {record.name} as {old.source_type} {list(old.shape)}, "
                        f"not {record.source_type} {list(record.shape)}"
                    )

    def tensors(self) -> dict[str, TensorRecord]:
        """Every recorded tensor, by name."""
        try:
            return {row["name"]: _tensor_record(row) for row in self._db["tensors"].rows}
        except (ValueError, TypeError):  # a shape that is not a JSON list
            raise BpwoptError(_not_state(self.path, "damaged: a tensor's shape is not a list of sizes")) from None

    def add_measurement(self, m: Measurement) -> None:
        """Store one measurement (replacing an earlier one of the same tensor and type), committed on return."""
        row = {
            "tensor": m.tensor,
            "qtype": m.qtype,
            "nbytes": int(m.nbytes),
            "rows_measured": int(m.rows_measured),
            "rows_total": int(m.rows_total),
            "seconds": float(m.seconds),
        }
        statistics = [
            {"tensor": m.tensor, "qtype": m.qtype, "name": name, "value": float(e.value), "stderr": float(e.stderr)}
            for name, e in m.statistics.items()
        ]
        try:
            with self._writing(), self._db.atomic():  # its own transaction, committed here
                self._db.execute("DELETE FROM statistics WHERE tensor = ? AND qtype = ?", [m.tensor, m.qtype])
                self._db["measurements"].insert(row, replace=True)
                self._db["statistics"].insert_all(statistics)
        except sqlite3.IntegrityError as error:
            raise ValueError(f"measurement of {m.tensor}: add its TensorRecord first ({error})") from None

    def measurements(self) -> dict[tuple[str, str], Measurement]:
        """Every measurement, by (tensor name, type name), with the statistics stored for it."""
        statistics: dict[tuple[str, str], dict[str, Estimate]] = {}
        for row in self._db["statistics"].rows:
            estimate = Estimate(_float(row["value"]), _float(row["stderr"]))
            if estimate.value < 0 or estimate.value == math.inf:  # no measurement makes these; NaN reads back as NaN
                raise BpwoptError(
                    _not_state(self.path, f"damaged: impossible {row['name']} of {row['tensor']} as {row['qtype']}")
                )
            statistics.setdefault((row["tensor"], row["qtype"]), {})[row["name"]] = estimate
        result = {}
        for row in self._db["measurements"].rows:
            key = (row["tensor"], row["qtype"])
            m = Measurement(**{**row, "seconds": _float(row["seconds"]), "statistics": statistics.get(key, {})})
            if min(m.nbytes, m.rows_measured, m.rows_total) < 0:
                raise BpwoptError(_not_state(self.path, f"damaged: impossible measurement of {m.tensor} as {m.qtype}"))
            result[key] = m
        return result

    def add_plan(self, plan: PlanRecord) -> int:
        """Store a solved plan, stamped with the current time; returns its id."""
        row = {
            "target": plan.target,
            "objective": plan.objective,
            "types": json.dumps(plan.types),
            "predicted_error": float(plan.predicted_error),
            "total_bytes": int(plan.total_bytes),
            "file_bytes": int(plan.file_bytes),
            "bits_per_weight": float(plan.bits_per_weight),
            "gap": float(plan.gap),
            "created": plan.created or _now(),
        }
        with self._writing():
            return int(self._db["plans"].insert(row).last_pk)

    def plans(self) -> list[tuple[int, PlanRecord]]:
        """Every stored plan with its id, oldest first."""
        result = []
        for row in self._db["plans"].rows_where(order_by="id"):
            plan_id = row.pop("id")
            floats = ("predicted_error", "bits_per_weight", "gap")
            plan = PlanRecord(**{**row, "types": json.loads(row["types"]), **{k: _float(row[k]) for k in floats}})
            result.append((plan_id, plan))
        return result

    def add_evaluation(self, plan_id: int | None, quant_path: str, metrics: dict[str, float], text_sha256: str) -> int:
        """Store the measured quality of a quantized file (of plan_id, or of a file from elsewhere); returns its id."""
        row = {
            "plan_id": plan_id,
            "quant_path": str(quant_path),
            "metrics": json.dumps({key: float(value) for key, value in metrics.items()}),
            "text_sha256": text_sha256,
            "created": _now(),
        }
        try:
            with self._writing():
                return int(self._db["evaluations"].insert(row).last_pk)
        except sqlite3.IntegrityError:
            raise ValueError(f"no plan {plan_id} in state file {self.path}") from None

    def evaluations(self) -> list[dict]:
        """Every evaluation, oldest first: dicts of id, plan_id, quant_path, metrics (a dict), text_sha256, created."""
        return [
            {**row, "metrics": json.loads(row["metrics"])} for row in self._db["evaluations"].rows_where(order_by="id")
        ]

    def set_values(self, table: str, values: dict[str, float]) -> None:
        """Replace every row of a value table (VALUE_TABLES: name -> float) atomically."""
        _check_value_table(table)
        with self._writing(), self._db.atomic():
            if not self._db[table].exists():
                _create_value_table(self._db, table)
            self._db.execute(f"DELETE FROM [{table}]")
            self._db[table].insert_all({"name": name, "value": float(value)} for name, value in values.items())

    def values(self, table: str) -> dict[str, float]:
        """A value table (VALUE_TABLES) as name -> float; empty if never set."""
        _check_value_table(table)
        if not self._db[table].exists():
            return {}
        return {row["name"]: _float(row["value"]) for row in self._db[table].rows}

    def close(self) -> None:
        """Close the database (checkpointing its WAL) and release the lock; closing twice is harmless."""
        if self._lock_fd is None:
            return
        self._db.close()  # before the lock descriptor: closing that would drop SQLite's POSIX locks
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> StateFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        if self.read_only:
            raise BpwoptError(f"state file {self.path} is read-only: nothing new can be stored in it")
        with _sqlite_errors(self.path, "write"):
            yield


def read_identity(path: str | os.PathLike) -> StateIdentity:
    """The identity stored in an existing state file, read without taking its lock (for plot, inspect)."""
    path = Path(path)
    if not path.is_file():
        raise BpwoptError(f"state file {path} does not exist" if not path.exists() else _not_state(path, "a directory"))
    try:
        with path.open("rb") as file:
            header = file.read(_HEADER_BYTES)
    except OSError as error:
        raise BpwoptError(f"cannot read state file {path}: {error.strerror}") from None
    _check_header(path, header)
    # A read-write connection that only reads: unlike mode=ro, closing it removes the -wal and -shm files it made.
    # Where neither can be written (read-only storage) the file is read as it is.
    read_only = not (_writable(path) and _writable(path.parent))
    if read_only:
        _check_nothing_unwritten(path)
    connection = _connect(path, read_only)
    try:
        with _sqlite_errors(path, "read"):
            return _validated_identity(path, _database(connection))[0]
    finally:
        connection.close()


def default_state_path(model_name: str, model_sha256: str, directory: Path = Path("state")) -> Path:
    """directory/<model name>-<first 16 hex digits of its sha256>-mse.bpw_state, the name made filesystem-safe."""
    safe_name = re.sub(r"[^\w.-]+", "_", model_name).strip("._-") or "model"
    while len(safe_name.encode()) > 128:  # keep the whole file name well under the usual 255-byte limit
        safe_name = safe_name[:-1]
    return Path(directory) / f"{safe_name}-{model_sha256[:16].lower()}-mse.bpw_state"



def _create(path: Path, identity: StateIdentity) -> None:
    """Build a complete state (schema and identity) in a temporary file, then link it into place.

    A kill at any moment leaves either no file at path or a complete one; only a
    `*.tmp` file may be left behind. The link (not a rename) never replaces a
    file that another process created at path meanwhile: that one wins, and is
    then checked like any existing state.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666: the umask decides, as for any file
    except OSError as error:
        raise BpwoptError(f"cannot create state file {path}: {error.strerror}") from None
    try:
        db = _database(sqlite3.connect(tmp))
        try:
            with _sqlite_errors(path, "create"), db.atomic():
                _create_schema(db)
                db["identity"].insert_all(_identity_rows(identity))
            with _sqlite_errors(path, "create"):
                db.enable_wal()  # persistent: recorded in the file's header
        finally:
            db.close()  # the last connection: SQLite checkpoints the WAL into the file and removes it
        try:
            fsync_path(tmp)
            _publish(tmp, path)
            fsync_path(path.parent)
        except OSError as error:
            raise BpwoptError(f"cannot create state file {path}: {error.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _database(connection: sqlite3.Connection) -> Database:
    """sqlite-utils over our own connection, without plugins or pragmas of its own."""
    return Database(connection, recursive_triggers=False, execute_plugins=False)


def _create_schema(db: Database) -> None:
    db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
    db.execute(f"PRAGMA user_version = {STATE_FORMAT_VERSION}")
    db["identity"].create({"key": str, "value": str}, pk="key", not_null={"key"}, strict=True)
    db["tensors"].create(
        {
            "name": str,
            "shape": str,  # JSON list
            "elements": int,
            "source_type": str,
            "category": str,
            "layer": int,
            "weight_energy": float,
            "plain_energy": float,
        },
        pk="name",
        not_null={"name", "shape", "elements", "source_type", "category"},
        strict=True,
    )
    _create_measurements(db)
    _create_statistics(db)
    db["plans"].create(
        {
            "id": int,
            "target": str,
            "objective": str,
            "types": str,  # JSON object: tensor name -> type name
            "predicted_error": float,
            "total_bytes": int,
            "file_bytes": int,
            "bits_per_weight": float,
            "gap": float,
            "created": str,
        },
        pk="id",
        not_null={"target", "objective", "types", "total_bytes", "file_bytes", "created"},
        strict=True,
    )
    db["evaluations"].create(
        {
            "id": int,
            "plan_id": int,
            "quant_path": str,
            "metrics": str,  # JSON object: metric name -> value
            "text_sha256": str,
            "created": str,
        },
        pk="id",
        not_null={"quant_path", "metrics", "created"},
        foreign_keys=[("plan_id", "plans", "id")],
        strict=True,
    )
    for table in VALUE_TABLES:
        _create_value_table(db, table)


def _create_measurements(db: Database, name: str = "measurements") -> None:
    # Float columns allow NULL: sqlite3 stores NaN as NULL, and it is read back as NaN.
    db[name].create(
        {"tensor": str, "qtype": str, "nbytes": int, "rows_measured": int, "rows_total": int, "seconds": float},
        pk=("tensor", "qtype"),
        not_null={"tensor", "qtype", "nbytes", "rows_measured", "rows_total"},
        foreign_keys=[("tensor", "tensors", "name")],
        strict=True,
    )


def _create_statistics(db: Database) -> None:
    """One row per (tensor, type, statistic): a new statistic is new rows, not a new column."""
    db.execute(
        "CREATE TABLE statistics (tensor TEXT NOT NULL, qtype TEXT NOT NULL, name TEXT NOT NULL, value REAL, "
        "stderr REAL, PRIMARY KEY (tensor, qtype, name), "
        "FOREIGN KEY (tensor, qtype) REFERENCES measurements (tensor, qtype)) STRICT"
    )


def _migrate_1_to_2(db: Database) -> None:
    """Statistics leave the measurements table for their own (weighted_sse and sse, with their standard errors)."""
    db.execute("ALTER TABLE measurements RENAME TO measurements_1")
    _create_measurements(db)
    db.execute(
        "INSERT INTO measurements SELECT tensor, qtype, nbytes, rows_measured, rows_total, seconds FROM measurements_1"
    )
    _create_statistics(db)
    for name in ("weighted_sse", "sse"):
        db.execute(
            f"INSERT INTO statistics SELECT tensor, qtype, '{name}', {name}, {name}_stderr FROM measurements_1"
        )
    db.execute("DROP TABLE measurements_1")


# format version -> the step that takes a state of that version to the next
_MIGRATIONS = {1: _migrate_1_to_2}


def _migrate(db: Database, version: int) -> None:
    """Bring a state of an older format version to this one, in one transaction: all of it happens or none."""
    if version == STATE_FORMAT_VERSION:
        return
    db.execute("PRAGMA foreign_keys = OFF")  # cannot change inside a transaction; tables are rebuilt below
    try:
        with db.atomic():
            for step in range(version, STATE_FORMAT_VERSION):
                _MIGRATIONS[step](db)
            db.execute("UPDATE identity SET value = ? WHERE key = 'format_version'", [str(STATE_FORMAT_VERSION)])
            db.execute(f"PRAGMA user_version = {STATE_FORMAT_VERSION}")
            problem = db.execute("PRAGMA foreign_key_check").fetchone()
            if problem is not None:
                raise BpwoptError(f"cannot migrate: a row of {problem[0]} refers to nothing in {problem[2]}")
    finally:
        db.execute("PRAGMA foreign_keys = ON")


def _create_value_table(db: Database, table: str) -> None:
    db[table].create({"name": str, "value": float}, pk="name", not_null={"name"}, strict=True)


def _identity_rows(identity: StateIdentity) -> list[dict]:
    values = {
        "format_version": str(STATE_FORMAT_VERSION),
        "model_sha256": identity.model_sha256,
        "model_name": identity.model_name,
        "imatrix_sha256": identity.imatrix_sha256,
        "candidates": ",".join(identity.candidates),
        "sampling": identity.sampling,
        "rounding": identity.rounding,
        "created": _now(),
    }
    return [{"key": key, "value": value} for key, value in values.items()]


def _publish(tmp: Path, path: Path) -> None:
    """Give the finished file its name, never replacing a file that is already there."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first; open() checks that one
    except OSError:
        # A file system without hard links: rename, after a (racy, but only between two creators) check.
        if not path.exists():
            os.replace(tmp, path)


def _writable(path: Path) -> bool:
    """Whether this process may write path, judged by its effective ids as the open itself will be."""
    return os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids)




def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    """A connection; read-only as an immutable file, since SQLite cannot make its -shm beside it there.

    immutable is safe here: the exclusive flock keeps every other bpwopt out,
    and `_check_nothing_unwritten` made sure no -wal holds commits the file lacks.
    """
    if not read_only:
        return sqlite3.connect(path)
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)


def _check_nothing_unwritten(path: Path) -> None:
    """Refuse a read-only state whose -wal (left by a killed run) holds commits an immutable read would miss."""
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise BpwoptError(
            f"state file {path} is read-only and {wal.name} beside it holds measurements not yet in it; "
            "open it once where it can be written"
        )


def _lock(path: Path) -> int:
    """An exclusive flock on the state file itself, held while it is open.

    flock and SQLite's own POSIX locks do not interact on local file systems.
    The kernel drops a flock when its process dies however it dies, so a
    killed run never leaves a stale lock behind, and no lock file is needed.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise BpwoptError(f"cannot open state file {path}: {error.strerror}") from None
    try:
        if not os.path.isfile(path):
            raise BpwoptError(_not_state(path, "a directory"))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BpwoptError(f"state file {path} is in use by another bpwopt process") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_header(path: Path, header: bytes) -> None:
    """Refuse anything whose SQLite header does not carry our application id, before SQLite touches it."""
    if len(header) < _HEADER_BYTES or not header.startswith(_SQLITE_MAGIC):
        raise BpwoptError(_not_state(path, "not an SQLite database" if header else "an empty file"))
    if int.from_bytes(header[68:72], "big") != _APPLICATION_ID:
        raise BpwoptError(_not_state(path, "an SQLite database of another program"))
    if header[18] not in (1, 2) or header[19] not in (1, 2):  # SQLite opens other versions read-only, or not at all
        raise BpwoptError(_not_state(path, f"damaged: file format versions {header[18]}, {header[19]} in its header"))


def _validated_identity(path: Path, db: Database) -> tuple[StateIdentity, int]:
    """The stored identity and format version, after checking the file is intact and has every table of it."""
    problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        first = " ".join(problems[0].replace("*** in database main ***", "").split())  # SQLite's is multi-line
        raise BpwoptError(_not_state(path, f"damaged: {first}"))
    # Our schema has neither; a trigger or view could make a plain insert or read do anything.
    extra = db.execute("SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'view')").fetchone()
    if extra is not None:
        raise BpwoptError(_not_state(path, f"it has a {extra[0]} {extra[1]!r}"))
    if "identity" not in db.table_names():
        raise BpwoptError(_not_state(path, "no identity table"))
    stored = {row["key"]: row["value"] for row in db["identity"].rows}
    try:
        version = int(stored["format_version"])
    except (KeyError, TypeError, ValueError):
        raise BpwoptError(_not_state(path, "no format version")) from None
    if version not in _TABLES_OF_VERSION:
        newer = " (written by a newer bpwopt)" if version > STATE_FORMAT_VERSION else ""
        raise BpwoptError(
            f"state file {path} has format version {version}{newer}, this bpwopt reads 1 to {STATE_FORMAT_VERSION}"
        )
    missing = [table for table in _TABLES_OF_VERSION[version] if table not in db.table_names()]
    absent = [key for key in ("model_sha256", "model_name", "candidates", "sampling") if key not in stored]
    if missing or absent:
        raise BpwoptError(_not_state(path, f"missing {', '.join(missing + absent)}"))
    return StateIdentity(
        model_sha256=stored["model_sha256"],
        model_name=stored["model_name"],
        imatrix_sha256=stored.get("imatrix_sha256"),
        candidates=tuple(stored["candidates"].split(",")) if stored["candidates"] else (),
        sampling=stored["sampling"],
        rounding=stored.get("rounding", DEFAULT_ROUNDING),  # states from before the option measured ggml's
    ), version


def _check_identity(path: Path, stored: StateIdentity, wanted: StateIdentity) -> None:
    """Refuse a state measured under another identity, naming the first thing that differs."""
    measured = f"state file {path} was measured"
    if stored.model_sha256 != wanted.model_sha256:
        raise BpwoptError(
            f"{measured} for another model (sha256 {_short(stored.model_sha256)} ≠ {_short(wanted.model_sha256)}); "
            "use another state file"
        )
    if stored.imatrix_sha256 != wanted.imatrix_sha256:
        if wanted.imatrix_sha256 is None:
            detail = f"with an imatrix (sha256 {_short(stored.imatrix_sha256)}), this run has none"
        elif stored.imatrix_sha256 is None:
            detail = "without an imatrix"
        else:
            detail = f"with another imatrix (sha256 {_short(stored.imatrix_sha256)} ≠ {_short(wanted.imatrix_sha256)})"
        raise BpwoptError(f"{measured} {detail}; use another state file")
    if set(stored.candidates) != set(wanted.candidates):
        raise BpwoptError(
            f"{measured} with candidates {','.join(stored.candidates)}, not {','.join(wanted.candidates)}; "
            "use another state file"
        )
    if stored.sampling != wanted.sampling:
        raise BpwoptError(f"{measured} with sampling {stored.sampling}, not {wanted.sampling}; use another state file")
    if stored.rounding != wanted.rounding:
        raise BpwoptError(
            f"{measured} with --rounding {stored.rounding}, not {wanted.rounding}; use another state file"
        )


@contextmanager
def _sqlite_errors(path: Path, action: str) -> Iterator[None]:
    """SQLite's errors as one-line BpwoptErrors: I/O (full disk, unwritable directory) and corruption."""
    try:
        yield
    except sqlite3.OperationalError as error:
        raise BpwoptError(f"cannot {action} state file {path}: {error}") from None
    except sqlite3.IntegrityError:
        raise  # a caller's mistake (a measurement of an unknown tensor), not the user's
    except sqlite3.DatabaseError as error:
        raise BpwoptError(_not_state(path, f"damaged: {error}")) from None


def _not_state(path: Path, reason: str) -> str:
    return f"{path} is not a bpwopt state file ({reason})"


def _check_value_table(table: str) -> None:
    if table not in VALUE_TABLES:
        raise ValueError(f"unknown value table {table!r}; valid: {', '.join(VALUE_TABLES)}")


def _tensor_row(record: TensorRecord) -> dict:
    return {
        "name": record.name,
        "shape": json.dumps([int(n) for n in record.shape]),
        "elements": int(record.elements),
        "source_type": record.source_type,
        "category": record.category,
        "layer": None if record.layer is None else int(record.layer),
        "weight_energy": float(record.weight_energy),
        "plain_energy": float(record.plain_energy),
    }


def _tensor_record(row: dict) -> TensorRecord:
    return TensorRecord(
        **{
            **row,
            "shape": tuple(json.loads(row["shape"])),
            "weight_energy": _float(row["weight_energy"]),
            "plain_energy": _float(row["plain_energy"]),
        }
    )


def _float(value: float | None) -> float:
    """A stored float; NULL is how sqlite3 stores NaN."""
    return math.nan if value is None else float(value)


def _short(sha256: str | None) -> str:
    return f"{(sha256 or '')[:_HASH_SHOWN]}…"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
