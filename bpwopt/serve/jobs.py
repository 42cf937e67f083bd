"""Background jobs of `bpwopt serve`: each one a `bpwopt` command line run as a child process.

A child process rather than a thread: the kernels hold the interpreter while they
run, a crash or a kill of a job cannot take the server with it, and a job is then
exactly the command a user would type, resumable from its state the same way.
Jobs naming the same state run one after another (a queue per state), never
interleaved; another process holding the state (a CLI run) makes the job fail with
the state's own one-line refusal. Progress is read from the child's progress bars.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

_BAR = re.compile(r"^(?P<stage>[a-z]+):\s+(?P<percent>\d+)%\|")  # tqdm: "measuring:  21%|██▏  | 4.99G/23.5G …"
# "wrote OUT (N bytes) in 3.8 s" or "wrote 3 shards, OUT-00001-of-00003.gguf first (N bytes in all) in …"
_WROTE = re.compile(r"^bpwopt: wrote (?:\d+ shards, )?(?P<path>.+?)(?: first)? \((?P<bytes>[\d,]+) bytes")
_ERROR = "bpwopt: error: "
STATUSES = ("queued", "running", "done", "failed", "stopped")


@dataclass
class Job:
    """One job as the API shows it; `events` is every change, in order, for the event stream."""

    id: str
    kind: str  # "write" or "evaluate"
    argv: list[str]  # the bpwopt command line it runs (without the program name)
    state: str | None  # the state file it uses, the key of its queue
    status: str = "queued"
    stage: str = ""  # the progress bar's stage: "measuring", "writing", …
    percent: int = 0
    written: list[dict] = field(default_factory=list)  # {"path", "bytes"} of each file written
    result: object = None  # what the command printed as JSON on stdout (an evaluation's metrics)
    log: list[str] = field(default_factory=list)  # the child's own lines (bpwopt: …), progress bars left out
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None  # when it left its state's queue
    finished: float | None = None

    def view(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "argv"} | {"command": self.command}

    @property
    def command(self) -> str:
        return " ".join(["bpwopt", *self.argv])


class JobRunner:
    """Runs jobs in the background: one queue (and one thread) per state, first in first out; states at once."""

    def __init__(self, program: Sequence[str] = (sys.executable, "-m", "bpwopt.cli")) -> None:
        self._program = list(program)
        self._jobs: dict[str, Job] = {}
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._children: dict[str, subprocess.Popen] = {}
        self._changed = threading.Condition()

    def submit(self, kind: str, argv: list[str], state: Path | None) -> Job:
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, argv=argv, state=str(state) if state else None)
        with self._changed:
            self._jobs[job.id] = job
            key = job.state or job.id  # a job without a state waits for nobody
            if key not in self._queues:
                self._queues[key] = queue.SimpleQueue()
                threading.Thread(target=self._work, args=(self._queues[key],), name=f"jobs-{key}", daemon=True).start()
            self._queues[key].put(job)
            self._changed.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda job: job.created)

    def views(self, job: Job, timeout: float = 15.0) -> Iterator[dict]:
        """The job's view now, then after each change until it ends; the view again after timeout without one."""
        last = None
        while True:
            with self._changed:
                view = job.view()
                if view == last:
                    self._changed.wait(timeout)
                    view = job.view()
            if view != last or last is None:
                yield view
            last = view
            if view["status"] not in ("queued", "running"):  # the view's, not the job's: that one may be newer
                return

    def stop_all(self) -> None:
        """SIGTERM to every child: the CLI stops cleanly, its state keeps what was measured."""
        for child in list(self._children.values()):
            child.terminate()
        for child in list(self._children.values()):
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()

    def _update(self, job: Job, **changes) -> None:
        with self._changed:
            for key, value in changes.items():
                setattr(job, key, value)
            self._changed.notify_all()

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while True:
            job = jobs.get()
            try:
                self._run(job)
            except Exception as error:  # the child could not start (an OSError): this job fails, the queue goes on
                self._update(job, status="failed", error=f"{type(error).__name__}: {error}", finished=time.time())

    def _run(self, job: Job) -> None:
        self._update(job, status="running", started=time.time())
        with tempfile.TemporaryFile("w+") as stdout:
            child = subprocess.Popen([*self._program, *job.argv], stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
            self._children[job.id] = child
            try:
                for line in _lines(child.stderr):
                    self._read(job, line)
                status = child.wait()
            finally:
                self._children.pop(job.id, None)
            stdout.seek(0)
            printed = stdout.read()
        if status == 0:
            self._update(job, status="done", percent=100, result=_json_or_none(printed), finished=time.time())
        else:
            stopped = status < 0 or status >= 128
            error = job.error or (job.log[-1] if job.log else f"bpwopt exited with status {status}")
            self._update(job, status="stopped" if stopped else "failed", error=error, finished=time.time())

    def _read(self, job: Job, line: str) -> None:
        bar = _BAR.match(line)
        if bar:
            if (bar["stage"], int(bar["percent"])) != (job.stage, job.percent):
                self._update(job, stage=bar["stage"], percent=int(bar["percent"]))
            return
        if not line.strip():
            return
        changes: dict = {"log": [*job.log, line]}
        wrote = _WROTE.match(line)
        if wrote:
            changes["written"] = [*job.written, {"path": wrote["path"], "bytes": int(wrote["bytes"].replace(",", ""))}]
        if line.startswith(_ERROR):
            changes["error"] = line[len(_ERROR):]
        self._update(job, **changes)


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None


def _lines(stream) -> Iterator[str]:
    """The child's stderr split at newlines and at the carriage returns progress bars redraw with."""
    pending = ""
    while chunk := stream.read(256):
        pending += chunk
        *complete, pending = re.split(r"[\r\n]", pending)
        yield from complete
    if pending:
        yield pending
