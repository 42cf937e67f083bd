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
from concurrent.futures import ThreadPoolExecutor

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


@pytest.mark.parametrize("model", ["a" * 5000 + ".gguf", "\x00.gguf", "  "])
def test_a_path_no_file_can_have_is_a_one_line_404(client, state_id, model):
    response = client.post("/api/plans", json=plan_body(state_id, model=model, target_size="70MB"))
    assert response.status_code == 404
    assert "\n" not in response.json()["detail"] and len(response.json()["detail"]) < 300


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


@pytest.fixture(scope="module")
def server(root):
    """`bpwopt serve` itself (uvicorn) on a free port over the served folder; its address."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "bpwopt.cli", "serve", "--port", str(port), "--root", str(root)],
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    address = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{address}/api/models", timeout=5)
            break
        except httpx.ConnectError:
            assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
            time.sleep(0.2)
    yield address
    child.terminate()
    child.wait(timeout=30)


def test_the_server_answers_over_http(server):
    assert "demo.bpw_state" in [s["path"] for s in httpx.get(f"{server}/api/states", timeout=5).json()]
    assert httpx.get(f"{server}/openapi.json", timeout=5).json()["info"]["title"] == "bpwopt"
    page = httpx.get(f"{server}/", timeout=5)
    assert page.status_code == 200 and '<script src="/static/plotly.min.js">' in page.text
    assert httpx.get(f"{server}/static/plotly.min.js", timeout=5).text.startswith("/**")



def finished(client, job: dict, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


def submit(client, **body) -> dict:
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_write_job_writes_the_file_and_says_where(client, root, state_id):
    job = finished(client, submit(client, kind="write", model="models/demo.gguf", state=state_id,
                                  target_sizes=["75MB"], allow_requantize=True))  # fmt: skip
    written = root / "models" / "demo-bpwopt-75MB.gguf"
    assert job["status"] == "done", job
    assert job["written"] == [{"path": str(written), "bytes": written.stat().st_size}]
    assert written.stat().st_size <= 75_000_000 and written.read_bytes()[:4] == b"GGUF"
    assert any("reused" in line for line in job["log"])  # measured before: nothing measured again
    assert job["command"].startswith("bpwopt --state-file ")


def test_a_ladder_job_writes_one_file_per_size(client, root, state_id):
    job = finished(client, submit(client, kind="write", model="models/demo.gguf", state=state_id,
                                  target_sizes=["70MB", "80MB"], allow_requantize=True))  # fmt: skip
    assert job["status"] == "done", job
    expected = [str(root / "models" / f"demo-bpwopt-{size}.gguf") for size in ("70MB", "80MB")]
    assert [w["path"] for w in job["written"]] == expected


def test_jobs_on_one_state_run_one_after_the_other(client, state_id):
    body = dict(kind="measure", model="models/demo.gguf", state=state_id, target_bpw=4.5, allow_requantize=True)
    jobs = [finished(client, job) for job in [submit(client, **body) for _ in range(3)]]
    assert [job["status"] for job in jobs] == ["done"] * 3
    assert jobs[0]["finished"] <= jobs[1]["started"] and jobs[1]["finished"] <= jobs[2]["started"]  # in order
    assert [job["id"] for job in client.get("/api/jobs").json()][-3:] == [job["id"] for job in jobs]


def test_the_event_stream_follows_a_job_to_its_end(client, state_id):
    job = submit(client, kind="write", model="models/demo.gguf", state=state_id, target_sizes=["72MB"],
                 allow_requantize=True)  # fmt: skip
    views = []
    with client.stream("GET", f"/api/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        views = [json.loads(line[len("data: "):]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert views[-1]["status"] == "done" and views[-1]["written"]
    writing = [v["percent"] for v in views if v["stage"] == "writing" and v["status"] == "running"]
    assert writing == sorted(writing)


def test_a_job_that_fails_says_why_in_one_line(client, state_id):
    job = finished(client, submit(client, kind="write", model="models/demo.gguf", state=state_id,
                                  target_sizes=["1MB"], allow_requantize=True))  # fmt: skip
    assert job["status"] == "failed"
    assert "below" in job["error"] and "\n" not in job["error"]


def test_an_evaluate_job_returns_the_kld(client, root):
    quant = next((root / "models").glob("demo-bpwopt-*.gguf"), None) or pytest.fail("no written file to evaluate")
    job = finished(client, submit(client, kind="evaluate", model="models/demo.gguf",
                                  quant=str(quant.relative_to(root)), chunks=1))  # fmt: skip
    assert job["status"] == "done", job
    assert job["result"]["mean_kld"] > 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"kind": "write", "model": "models/demo.gguf"}, 422),
        ({"kind": "write", "model": "models/demo.gguf", "target_sizes": ["1MB"], "target_bpw": 4.0}, 422),
        ({"kind": "evaluate", "model": "models/demo.gguf"}, 422),
        ({"kind": "delete", "model": "models/demo.gguf", "target_bpw": 4.0}, 422),
        ({"kind": "write", "model": "models/demo.gguf", "target_sizes": ["big"]}, 400),
        ({"kind": "write", "model": "models/demo.gguf", "target_bpw": 4.0, "output": "../out.gguf"}, 404),
        ({"kind": "write", "model": "models/missing.gguf", "target_bpw": 4.0}, 404),
        ({"kind": "write", "model": "models/demo.gguf", "target_bpw": 4.0, "state": "../s.bpw_state"}, 404),
    ],
)
def test_a_bad_job_request_is_refused_before_anything_runs(client, body, status):
    before = len(client.get("/api/jobs").json())
    assert client.post("/api/jobs", json=body).status_code == status
    assert len(client.get("/api/jobs").json()) == before
    assert client.get("/api/jobs/nosuchjob").status_code == 404


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven through Debian's chromedriver (.ci/run installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or pytest.fail("chromium is not installed (see .ci/run)")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver_path = shutil.which("chromedriver") or pytest.fail("chromedriver is not installed (see .ci/run)")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_the_page_shows_the_plan_dry_run_json_gives_and_writes_it(browser, server, root, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(f"{server}/")
    wait.until(lambda page: page.find_element(By.ID, "plan").get_attribute("data-types"))
    shown_at = browser.find_element(By.ID, "bpw-value").get_attribute("data-bpw")
    slider = browser.find_element(By.ID, "bpw")
    for _ in range(12):  # twelve points of the curve down
        slider.send_keys(Keys.ARROW_LEFT)
    bpw = browser.find_element(By.ID, "bpw-value").get_attribute("data-bpw")
    assert float(bpw) < float(shown_at)
    asked = json.dumps({"target_bpw": float(bpw)}, separators=(",", ":"))
    wait.until(lambda page: page.find_element(By.ID, "plan").get_attribute("data-target") == asked)
    shown = browser.find_element(By.ID, "plan")
    argv = ["--allow-requantize", "--dry-run", "--json", "--state-file", str(root / "demo.bpw_state"),
            "--target-bpw", bpw, str(root / "models" / "demo.gguf")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    expected = json.loads(capsys.readouterr().out)
    assert json.loads(shown.get_attribute("data-types")) == {t["name"]: t["qtype"] for t in expected["tensors"]}
    file_bytes = int(browser.find_element(By.ID, "plan-file").get_attribute("data-file-bytes"))
    assert file_bytes == expected["file_bytes"]
    assert browser.find_element(By.ID, "plan-file").text.startswith(f"{file_bytes:,} bytes")

    browser.find_element(By.ID, "write").click()
    done = wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#jobs li[data-status=done]"))
    written = root / "models" / f"demo-bpwopt-{float(bpw):.4f}bpw.gguf"
    assert done[0].find_element(By.CLASS_NAME, "written").text == f"wrote {written} ({file_bytes:,} bytes)"
    assert written.stat().st_size == file_bytes

    browser.find_element(By.ID, "chunks").send_keys("1")
    done[0].find_element(By.CLASS_NAME, "evaluate").click()  # measure the KLD of the file just written
    kld = wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#jobs li[data-status=done] .kld"))
    assert kld[0].text.startswith("KLD ") and "perplexity" in kld[0].text
    stored = wait.until(lambda page: page.execute_script(  # the curve redrawn: the stored plan with its KLD
        "return document.getElementById('curve').data[2].customdata.filter((text) => text).length"))
    assert stored >= 1
    assert browser.get_log("browser") == []  # no script error, no failed request
    if os.environ.get("BPWOPT_SCREENSHOT"):  # the README's picture: BPWOPT_SCREENSHOT=docs/serve.png pytest -k page
        browser.save_screenshot(os.environ["BPWOPT_SCREENSHOT"])
    browser.get("about:blank")  # the page asks nothing more of the server: the tests after it have the state


def test_plans_asked_at_once_on_one_state_are_all_answered(client, state_id):
    """The state is open in one request at a time (its lock): the others wait for it instead of being refused."""
    bodies = [plan_body(state_id, target_bpw=bpw, compare_presets=False) for bpw in (4.6, 4.8, 5.0, 5.2, 5.4, 5.6)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: client.post("/api/plans", json=body), bodies))
    assert [answer.status_code for answer in answers] == [200] * len(bodies), [a.text for a in answers]
    assert [a.json()["bits_per_weight"] <= b["target_bpw"] for a, b in zip(answers, bodies, strict=True)] == [True] * 6


def test_a_measure_job_reports_what_it_measured(client, state_id):
    job = finished(client, submit(client, kind="measure", model="models/demo.gguf", state=state_id, target_bpw=4.5,
                                  allow_requantize=True, threads=2))  # fmt: skip
    assert job["status"] == "done", job
    assert "--threads 2" in job["command"]
    assert any(line.startswith("bpwopt: measured 0 ") and "reused" in line for line in job["log"]), job["log"]


def test_a_plan_without_the_preset_comparisons_is_the_same_plan(client, state_id):
    full = client.post("/api/plans", json=plan_body(state_id, target_size="78MB")).json()
    quick = client.post("/api/plans", json=plan_body(state_id, target_size="78MB", compare_presets=False)).json()
    assert full["comparisons"] and quick["comparisons"] == []
    assert [t["qtype"] for t in quick["tensors"]] == [t["qtype"] for t in full["tensors"]]
