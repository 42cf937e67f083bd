"""`bpwopt serve`'s API on the demo model's measured state: every endpoint, bad requests, path escapes, the token."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from bpwopt.cli.main import main
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.serve.access import COOKIE, needs_token
from bpwopt.serve.api import create_app
from bpwopt.serve.roots import Roots
from bpwopt.solve.targets import Target

DEMO_SIZE = 80_000_000
TIMING_KEYS = ("solve_seconds", "measure_seconds", "write_seconds")


@pytest.fixture(scope="module")
def root(tmp_path_factory, demo_model_path):
    """A served folder: the demo model, its state measured with one plan stored, and a subfolder."""
    folder = tmp_path_factory.mktemp("served")
    model = folder / "models" / "demo.gguf"
    model.parent.mkdir()
    shutil.copyfile(demo_model_path, model)
    optimize_file(OptimizeJob(input_path=model, output_path=None, target=Target(file_bytes=DEMO_SIZE),
                              options=QuantizeOptions(allow_requantize=True), state_path=folder / "demo.bpw_state",
                              dry_run=True, progress=False))  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def client(root):
    return TestClient(create_app(Roots.of([root])))


@pytest.fixture(scope="module")
def state_id(client):
    (state,) = client.get("/api/states").json()
    return state["id"]


def plan_body(state_id: str, **changes) -> dict:
    return {"state": state_id, "model": "models/demo.gguf", "allow_requantize": True, **changes}


def without_timings(report: dict) -> dict:
    return {key: value for key, value in report.items() if key not in TIMING_KEYS}


def test_models_lists_the_gguf_files_under_the_root(client, root):
    assert client.get("/api/models").json() == [
        {"path": "models/demo.gguf", "bytes": (root / "models" / "demo.gguf").stat().st_size}
    ]


def test_states_lists_the_state_with_what_it_holds(client):
    (state,) = client.get("/api/states").json()
    assert (state["path"], state["imatrix_sha256"]) == ("demo.bpw_state", None)
    assert state["model_name"] == "Smollm2 135M 8k Lc100K Mix1 Ep2"  # its general.name
    assert state["measurements"] > 500 and state["plans"] >= 1
    assert len(state["id"]) == 16


def test_the_front_falls_as_bits_rise_and_marks_the_stored_plan(client, state_id):
    front = client.get(f"/api/states/{state_id}/front").json()
    bpw, error = front["bits_per_weight"], front["error"]
    assert len(bpw) > 10 and bpw == sorted(bpw)
    assert all(later < earlier for earlier, later in itertools.pairwise(error))
    assert f"#1 (size<={DEMO_SIZE})" in [p["label"] for p in front["plans"]]
    assert front["presets"] == [] and "presets not shown" in front["note"]


def test_the_front_with_its_model_places_llama_cpps_presets(client, state_id):
    front = client.get(f"/api/states/{state_id}/front", params={"model": "models/demo.gguf"}).json()
    labels = " ".join(p["label"] for p in front["presets"])
    assert "Q8_0" in labels and "Q4_0" in labels
    assert front["note"] == ""


@pytest.mark.parametrize("target", [{"target_size": "75MB"}, {"target_bpw": 5.0}])
def test_a_plan_is_what_dry_run_json_prints(client, state_id, root, capsys, target):
    served = client.post("/api/plans", json=plan_body(state_id, **target))
    assert served.status_code == 200, served.text
    flag, value = ("--target-size", "75MB") if "target_size" in target else ("--target-bpw", "5.0")
    argv = ["--allow-requantize", "--dry-run", "--json", "--state-file", str(root / "demo.bpw_state"), flag, value,
            str(root / "models" / "demo.gguf")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert without_timings(served.json()) == without_timings(json.loads(capsys.readouterr().out))


def test_a_plan_stores_nothing_in_the_state(client, state_id):
    (before,) = client.get("/api/states").json()
    assert client.post("/api/plans", json=plan_body(state_id, target_size="70MB")).status_code == 200
    assert client.get("/api/states").json() == [before]


@pytest.mark.parametrize(
    "changes",
    [{}, {"target_size": "70MB", "target_bpw": 5.0}, {"target_bpw": -1}, {"target_size": "70MB", "imatrx": "x"}],
    ids=["no target", "two targets", "negative bpw", "unknown field"],
)
def test_a_malformed_plan_request_is_a_422(client, state_id, changes):
    response = client.post("/api/plans", json=plan_body(state_id, **changes))
    assert response.status_code == 422


def test_a_size_that_is_not_one_is_a_one_line_400(client, state_id):
    response = client.post("/api/plans", json=plan_body(state_id, target_size="eighty"))
    assert response.status_code == 400
    assert "\n" not in response.json()["detail"] and "eighty" in response.json()["detail"]


def test_an_unknown_state_is_a_404(client):
    response = client.post("/api/plans", json=plan_body("0" * 16, target_size="70MB"))
    assert response.status_code == 404
    assert client.get(f"/api/states/{'0' * 16}/front").status_code == 404


@pytest.mark.parametrize("model", ["../outside.gguf", "/etc/passwd", "models/../../outside.gguf", "link.gguf"])
def test_a_path_outside_the_root_is_refused(client, state_id, root, model):
    (root.parent / "outside.gguf").write_bytes(b"GGUF")
    if not (root / "link.gguf").is_symlink():
        os.symlink(root.parent / "outside.gguf", root / "link.gguf")
    response = client.post("/api/plans", json=plan_body(state_id, model=model, target_size="70MB"))
    assert response.status_code == 404
    assert "outside the folders this server was given" in response.json()["detail"]
    assert "link.gguf" not in [m["path"] for m in client.get("/api/models").json()]


def test_a_state_lacking_a_measurement_is_not_measured_by_a_plan(root, demo_model_path, tmp_path):
    shutil.copyfile(root / "models" / "demo.gguf", tmp_path / "demo.gguf")
    shutil.copyfile(root / "demo.bpw_state", tmp_path / "demo.bpw_state")
    with sqlite3.connect(tmp_path / "demo.bpw_state") as db:
        db.execute("DELETE FROM statistics WHERE rowid IN (SELECT rowid FROM statistics LIMIT 1)")
    client = TestClient(create_app(Roots.of([tmp_path])))
    (state,) = client.get("/api/states").json()
    response = client.post("/api/plans", json=plan_body(state["id"], model="demo.gguf", target_size="70MB"))
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "lacks 1 measurement(s)" in detail and "measure the model first" in detail
    assert client.get("/api/states").json()[0]["measurements"] == state["measurements"]


def test_with_a_token_every_request_needs_it(root):
    client = TestClient(create_app(Roots.of([root]), token="s3cret"))
    assert client.get("/api/models").status_code == 401
    assert client.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    first = client.get("/api/models", params={"token": "s3cret"})
    assert first.status_code == 200 and first.cookies.get(COOKIE) == "s3cret"
    assert client.get("/docs").status_code == 200  # the cookie the first visit set


@pytest.mark.parametrize(
    ("host", "needed"),
    [("127.0.0.1", False), ("::1", False), ("localhost", False), ("0.0.0.0", True), ("192.168.1.20", True),
     ("box.lan", True)],
)  # fmt: skip
def test_a_token_is_needed_beyond_loopback(host, needed):
    assert needs_token(host) is needed


def test_serve_refuses_a_root_that_is_not_a_folder(tmp_path, capsys):
    assert main(["serve", "--root", str(tmp_path / "missing")]) == 1
    expected = f"bpwopt: error: --root {tmp_path / 'missing'}: not a folder"
    assert capsys.readouterr().err.strip().splitlines() == [expected]


def test_the_server_answers_over_http(root):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "bpwopt.cli", "serve", "--port", str(port), "--root", str(root)],
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/states", timeout=5)
                break
            except httpx.ConnectError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.2)
        assert [s["path"] for s in response.json()] == ["demo.bpw_state"]
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).json()["info"]["title"] == "bpwopt"
    finally:
        server.terminate()
        server.wait(timeout=30)
