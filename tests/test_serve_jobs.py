"""`bpwopt serve`'s jobs beyond one run: cancelling, the job list on disk, a restarted server resuming its jobs."""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest
from fastapi.testclient import TestClient

from bpwopt.errors import BpwoptError
from bpwopt.serve.api import create_app
from bpwopt.serve.jobs import JobRunner
from bpwopt.serve.journal import Journal, read_journal
from bpwopt.serve.roots import Roots

# A real child that reports progress the way bpwopt's bars do, then works until it is stopped.
SLOW = [sys.executable, "-c", "import sys, time; print('measuring:  5%|', file=sys.stderr, flush=True); time.sleep(99)"]


def wait_for(condition, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_cancel_stops_a_running_job_and_drops_a_queued_one(tmp_path):
    runner = JobRunner(program=SLOW, journal=Journal(tmp_path / "jobs.json"))
    running = runner.submit("measure", [], tmp_path / "a.bpw_state")
    queued = runner.submit("measure", [], tmp_path / "a.bpw_state")  # same state: waits behind the first
    wait_for(lambda: running.percent == 5)
    assert queued.status == "queued"
    assert runner.cancel(queued) and queued.status == "stopped" and queued.started is None
    assert runner.cancel(running)
    wait_for(lambda: running.status == "stopped")
    assert running.error == "cancelled"
    assert not runner.cancel(running)  # it has ended
    time.sleep(0.3)
    assert queued.started is None  # the queue went past it
    stored = {record["id"]: record["status"] for record in read_journal(tmp_path / "jobs.json")}
    assert stored == {running.id: "stopped", queued.id: "stopped"}


def test_a_stop_interrupts_jobs_and_the_next_runner_gets_them_back(tmp_path):
    journal = tmp_path / "jobs.json"
    runner = JobRunner(program=SLOW, journal=Journal(journal))
    running = runner.submit("measure", ["first"], tmp_path / "a.bpw_state", {"kind": "measure"})
    queued = runner.submit("measure", ["second"], tmp_path / "a.bpw_state")
    ended = runner.submit("write", [], None)  # no state: runs at once, beside the others
    wait_for(lambda: running.percent == 5 and ended.percent == 5)
    runner.cancel(ended)
    wait_for(lambda: ended.status == "stopped")
    runner.stop_all()
    assert (running.status, queued.status) == ("interrupted", "queued")
    assert "next start resumes" in running.error

    again = JobRunner(program=SLOW, journal=Journal(journal))
    interrupted = again.restore()
    assert [job.id for job in interrupted] == [running.id, queued.id]  # oldest first, as they were queued
    assert all(job.status == "interrupted" for job in interrupted)
    assert interrupted[0].request == {"kind": "measure"} and interrupted[0].argv == ["first"]
    assert {job.id: job.status for job in again.all()}[ended.id] == "stopped"  # an ended job is kept as it was


def test_a_journal_that_is_not_a_job_list_is_a_one_line_error(tmp_path):
    journal = tmp_path / "jobs.json"
    for text in ("{not json", '{"a": 1}', "[1, 2]", '[{"id": "j1"}]'):
        journal.write_text(text)
        with pytest.raises(BpwoptError, match="not a bpwopt serve job list") as refused:
            create_app(Roots.of([tmp_path]), journal=journal)
        assert "\n" not in str(refused.value)
        assert journal.read_text() == text  # left as it was, for the user to look at


def test_a_journal_that_cannot_be_written_is_said_once_and_the_jobs_still_run(tmp_path, capsys):
    runner = JobRunner(program=[sys.executable, "-c", "pass"], journal=Journal(tmp_path / "missing" / "jobs.json"))
    jobs = [runner.submit("write", [], None) for _ in range(2)]
    wait_for(lambda: all(job.status == "done" for job in jobs))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "not remembered" in line]
    assert len(warnings) == 1 and "missing" in warnings[0]


@pytest.fixture
def served(tmp_path, demo_model_path):
    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copyfile(demo_model_path, folder / "demo.gguf")
    return folder


def measure_body(**changes) -> dict:
    return {"kind": "measure", "model": "demo.gguf", "state": "resume.bpw_state", "target_bpw": 4.5,
            "allow_requantize": True, **changes}  # fmt: skip


def test_a_restarted_server_resumes_the_measurement_its_stop_interrupted(served, tmp_path):
    journal = tmp_path / "jobs.json"
    with TestClient(create_app(Roots.of([served]), journal=journal)) as client:  # leaving it stops the server
        job = client.post("/api/jobs", json=measure_body()).json()
        wait_for(lambda: client.get(f"/api/jobs/{job['id']}").json()["percent"] >= 5)
    (stored,) = read_journal(journal)
    assert (stored["id"], stored["status"]) == (job["id"], "interrupted")

    with TestClient(create_app(Roots.of([served]), journal=journal)) as client:
        resumed = wait_for(lambda: (view := client.get(f"/api/jobs/{job['id']}").json())["status"] == "done" and view)
        note = next(i for i, line in enumerate(resumed["log"]) if line.startswith("bpwopt serve: resumed after"))
        assert "bpwopt: terminated by SIGTERM" in resumed["log"][:note]  # the first run's lines are kept, before it
        summary = next(line for line in resumed["log"][note:] if " pairs" in line and "reused" in line)  # stdout
        assert int(summary.split("reused ")[1].split()[0]) > 0, summary  # what the first server measured was kept
        assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 409  # it has ended
    assert read_journal(journal)[0]["status"] == "done"


def test_an_interrupted_job_whose_paths_left_the_roots_is_not_resumed(served, tmp_path):
    journal = tmp_path / "jobs.json"
    record = {"id": "j1", "kind": "measure", "argv": [], "state": None, "status": "running",
              "request": measure_body(model="elsewhere/demo.gguf")}  # fmt: skip
    unreadable = record | {"id": "j2", "request": {"kind": "measure"}}  # no model, no target
    journal.write_text(json.dumps([record, unreadable]))
    client = TestClient(create_app(Roots.of([served]), journal=journal))
    job = client.get("/api/jobs/j1").json()
    assert job["status"] == "failed" and job["error"].startswith("not resumed: elsewhere/demo.gguf")
    job = client.get("/api/jobs/j2").json()
    assert job["status"] == "failed" and job["error"] == "not resumed: Field required"


def test_cancel_is_for_jobs_that_exist(served):
    client = TestClient(create_app(Roots.of([served])))
    assert client.post("/api/jobs/nosuchjob/cancel").status_code == 404
