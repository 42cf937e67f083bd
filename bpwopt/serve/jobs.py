"""Background jobs of `bpwopt serve`: each one a `bpwopt` command line run as a child process.

A child process rather than a thread: the kernels hold the interpreter while they
run, a crash or a kill of a job cannot take the server with it, and a job is then
exactly the command a user would type, resumable from its state the same way
(which is how a restarted server resumes the jobs its stop interrupted). Jobs
naming the same state run one after another (a queue per state), never
interleaved; another process holding the state (a CLI run) makes the job fail
with the state's own one-line refusal. Progress is read from the child's
progress bars.
"""

from __future__ import annotations

import codecs
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO

from bpwopt.errors import BpwoptError
from bpwopt.serve.journal import Journal, read_journal

_BAR = re.compile(r"^(?P<stage>[a-z]+):\s+(?P<percent>\d+)%\|")  # tqdm: "measuring:  21%|██▏  | 4.99G/23.5G …"
# "wrote OUT (N bytes) in 3.8 s" or "wrote 3 shards, OUT-00001-of-00003.gguf first (N bytes in all) in …"
_WROTE = re.compile(r"^bpwopt: wrote (?:\d+ shards, )?(?P<path>.+?)(?: first)? \((?P<bytes>[\d,]+) bytes")
_ERROR = "bpwopt: error: "
# A job's status: queued, running, done, failed, stopped (cancelled) or interrupted (by the server's stop,
# resumed at its next start).
UNFINISHED = ("queued", "running")


@dataclass
class Job:
    """One job as the API shows it (and as the journal keeps it)."""

    id: str
    kind: str  # "write", "measure" or "evaluate"
    argv: list[str]  # the bpwopt command line it runs (without the program name)
    state: str | None  # the state file it uses, the key of its queue
    request: dict = field(default_factory=dict)  # the API request that made it: a restarted server resumes from it
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
    """Runs jobs in the background: one queue (and one thread) per state, first in first out; states at once.

    With a journal the job list outlives the server: `restore` reads it back,
    and the jobs a stop interrupted (or left queued) are handed back to be resumed.
    """

    def __init__(self, program: Sequence[str] = (sys.executable, "-m", "bpwopt.cli"),
                 journal: Journal | None = None) -> None:  # fmt: skip
        self._program = list(program)
        self._journal = journal
        self._jobs: dict[str, Job] = {}
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._children: dict[str, subprocess.Popen] = {}
        self._cancelled: set[str] = set()
        self._stopping = False
        self._changed = threading.Condition()
        self._saving = threading.Lock()

    def restore(self) -> list[Job]:
        """The journal's jobs back in the list; those that had not finished are returned, as "interrupted"."""
        if self._journal is None:
            return []
        known = {f.name for f in fields(Job)}
        interrupted = []
        for record in read_journal(self._journal.path):
            try:
                job = Job(**{key: value for key, value in record.items() if key in known})
            except TypeError:  # a record lacking a field every job has: not a list this server wrote
                raise BpwoptError(f"{self._journal.path}: not a bpwopt serve job list (job {record['id']!r} is "
                                  "incomplete); move it away or give --jobs-file") from None  # fmt: skip
            if job.status in (*UNFINISHED, "interrupted"):
                job.status = "interrupted"
                interrupted.append(job)
            self._jobs[job.id] = job
        return interrupted

    def submit(self, kind: str, argv: list[str], state: Path | None, request: dict | None = None) -> Job:
        job = Job(id=uuid.uuid4().hex[:12], kind=kind, argv=argv, state=str(state) if state else None,
                  request=request or {})  # fmt: skip
        self._enqueue(job)
        return job

    def resume(self, job: Job, argv: list[str], state: Path | None) -> None:
        """Run an interrupted job again, from the start of its command: its state keeps what it measured."""
        note = "bpwopt serve: resumed after a restart; the state keeps what was measured before"
        job.argv, job.state, job.stage, job.percent, job.error = argv, str(state) if state else None, "", 0, None
        job.log, job.started, job.finished, job.status = [*job.log, note], None, None, "queued"
        self._enqueue(job)

    def fail(self, job: Job, error: str) -> None:
        self._update(job, status="failed", error=error, finished=time.time())

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
            if view["status"] not in UNFINISHED:  # the view's, not the job's: that one may be newer
                return

    def cancel(self, job: Job) -> bool:
        """Stop a job: a queued one never starts, a running one gets SIGTERM. False if it had already ended.

        A stopped measurement keeps what it measured in its state, like an interrupted CLI run.
        """
        with self._changed:
            if job.status not in UNFINISHED:
                return False
            self._cancelled.add(job.id)
            child = self._children.get(job.id)
            if job.status == "queued":
                job.status, job.error, job.finished = "stopped", "cancelled before it started", time.time()
                self._changed.notify_all()
        if child is not None:
            child.terminate()
        self._save()
        return True

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM to every child (the CLI stops cleanly, its state keeps what was measured), and start no more.

        Their jobs end "interrupted", queued ones stay queued, and the journal says so: the next start resumes them.
        """
        with self._changed:
            self._stopping = True
            children = list(self._children.values())
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
        with self._changed:
            self._changed.wait_for(lambda: not any(job.status == "running" for job in self._jobs.values()), timeout)
        self._save()  # the list as it ends, on disk before the process exits

    def _enqueue(self, job: Job) -> None:
        with self._changed:
            self._jobs[job.id] = job
            key = job.state or job.id  # a job without a state waits for nobody
            if key not in self._queues:
                self._queues[key] = queue.SimpleQueue()
                threading.Thread(target=self._work, args=(self._queues[key],), name=f"jobs-{key}", daemon=True).start()
            self._queues[key].put(job)
            self._changed.notify_all()
        self._save()

    def _update(self, job: Job, **changes) -> None:
        with self._changed:
            for key, value in changes.items():
                setattr(job, key, value)
            self._changed.notify_all()
        if "status" in changes:
            self._save()

    def _save(self) -> None:
        """The whole list to the journal; under one lock, so that an older list never lands after a newer one."""
        if self._journal is None:
            return
        with self._saving:
            with self._changed:
                records = [asdict(job) for job in self.all()]
            self._journal.write(records)

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while True:
            job = jobs.get()
            try:
                self._run(job)
            except Exception as error:  # the child could not start (an OSError): this job fails, the queue goes on
                self.fail(job, f"{type(error).__name__}: {error}")

    def _run(self, job: Job) -> None:
        with tempfile.TemporaryFile("w+") as stdout:
            with self._changed:  # cancel and stop_all see the job running only with its child to signal
                if job.status != "queued" or self._stopping:
                    return  # cancelled while it waited, or the server is stopping: it stays queued for the next start
                child = subprocess.Popen([*self._program, *job.argv], stdin=subprocess.DEVNULL, stdout=stdout,
                                         stderr=subprocess.PIPE)  # fmt: skip
                self._children[job.id] = child
                job.status, job.started = "running", time.time()
                self._changed.notify_all()
            self._save()
            try:
                for line in _lines(child.stderr):
                    self._read(job, line)
                status = child.wait()
            finally:
                with self._changed:
                    self._children.pop(job.id, None)
            stdout.seek(0)
            printed = stdout.read()
        result = _json_or_none(printed)
        if result is None:  # a report on stdout (--dry-run prints its plan there): its summary lines join the log
            self._update(job, log=[*job.log, *(line for line in printed.splitlines() if line.startswith("bpwopt: "))])
        if status == 0:
            self._update(job, status="done", percent=100, result=result, finished=time.time())
        elif job.id in self._cancelled:
            self._update(job, status="stopped", error="cancelled", finished=time.time())
        elif self._stopping:
            self._update(job, status="interrupted", error="the server stopped; its next start resumes this job",
                         finished=time.time())  # fmt: skip
        else:
            error = job.error or (job.log[-1] if job.log else f"bpwopt exited with status {status}")
            self._update(job, status="failed", error=error, finished=time.time())

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


def _lines(stream: IO[bytes]) -> Iterator[str]:
    """The child's stderr split at newlines and at the carriage returns progress bars redraw with.

    Read with os.read, which returns what the pipe holds: a buffered read would wait for a full buffer,
    and a line of progress would wait with it.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := os.read(stream.fileno(), 4096):
        pending += decoder.decode(chunk)
        *complete, pending = re.split(r"[\r\n]", pending)
        yield from complete
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending
