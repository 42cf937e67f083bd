"""Measuring on a Ray cluster: a head and two worker nodes on 127.0.0.1, started by the test.

The measurements must be the ones the in-process run stores, value for value, also when a worker
process is killed while it measures a tensor (Ray runs that task again), and the CLI's `--ray`
must reach the cluster the way a user's command line does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import ray
from gguf import GGMLQuantizationType as Q

from bpwopt.cli.main import main
from bpwopt.errors import BpwoptError
from bpwopt.jobs.optimize import OptimizeJob, optimize_file
from bpwopt.measure.executors import RayExecutor
from bpwopt.measure.measure import Sampling, TensorTask, measure_tensor
from bpwopt.policy.llama import QuantizeOptions
from bpwopt.solve.targets import Target
from bpwopt.state.store import StateFile, read_identity

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RAY = str(Path(sys.executable).with_name("ray"))
CANDIDATES = (Q.Q4_0, Q.Q5_1, Q.Q8_0)  # a few cheap types: the point is where tasks run, not what they measure


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray(*arguments: str, env: dict[str, str]) -> None:
    subprocess.run([RAY, *arguments], check=True, env=env, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def cluster():
    """host:port of a local cluster: a head node and two worker nodes, one CPU each."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "NUMBA_NUM_THREADS": "1"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", env=env)  # fmt: skip
    try:
        for _ in range(2):
            _ray("start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1", env=env)
        yield address
    finally:
        ray.shutdown()
        _ray("stop", "--force", env=env)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job(model: Path, state: Path, **changes) -> OptimizeJob:
    job = OptimizeJob(
        input_path=model, output_path=None, target=Target(bits_per_weight=6.0), candidates=CANDIDATES,
        options=QuantizeOptions(allow_requantize=True), state_path=state, dry_run=True, progress=False,
    )  # fmt: skip
    return replace(job, **changes)


def _measurements(state: Path) -> dict:
    with StateFile.open(state, read_identity(state), create=False) as opened:
        return {key: m.statistics for key, m in opened.measurements().items()}


@pytest.fixture(scope="module")
def in_process(demo_model_path, tmp_path_factory):
    state = tmp_path_factory.mktemp("in-process") / "s.bpw_state"
    optimize_file(_job(demo_model_path, state))
    return _measurements(state)


def test_measurements_on_the_cluster_equal_the_in_process_ones(cluster, demo_model_path, tmp_path, in_process):
    state = tmp_path / "ray.bpw_state"
    report = optimize_file(_job(demo_model_path, state, ray_address=cluster))
    assert report.measured == len(in_process) > 500
    assert _measurements(state) == in_process


def _kill_a_measuring_worker(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker process seen measuring a tensor (its title is ray::measure_tensor)."""
    while not stop.is_set():
        for process in psutil.process_iter(["cmdline"]):
            if any("ray::measure_tensor" in part for part in process.info["cmdline"] or ()):
                process.kill()
                killed.append(process.pid)
                return
        time.sleep(0.05)


def test_a_worker_killed_mid_run_changes_nothing(cluster, demo_model_path, tmp_path, in_process):
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_a_measuring_worker, args=(killed, stop))
    watcher.start()
    try:
        optimize_file(_job(demo_model_path, tmp_path / "ray.bpw_state", ray_address=cluster))
    finally:
        stop.set()
        watcher.join()
    assert killed, "no worker was seen measuring: nothing was killed"
    assert _measurements(tmp_path / "ray.bpw_state") == in_process


def test_the_cli_measures_on_the_cluster_given_by_ray(cluster, demo_model_path, tmp_path, in_process, capsys):
    state = tmp_path / "cli.bpw_state"
    argv = ["--allow-requantize", "--dry-run", "--quiet", "--target-bpw", "6", "--candidates", "Q4_0,Q5_1,Q8_0",
            "--state-file", str(state), "--ray", cluster, str(demo_model_path)]  # fmt: skip
    assert main(argv) == 0
    assert f"measured {len(in_process)} (tensor, type) pairs" in capsys.readouterr().out
    assert _measurements(state) == in_process


def test_a_tasks_error_comes_back_as_the_task_raised_it(cluster, demo_model_path):
    task = TensorTask(model_path=str(demo_model_path), tensor="blk.99.no_such.weight", category="other",
                      types=("Q8_0",), weights=None, sampling=Sampling(), needs_record=True, work=1)  # fmt: skip
    with pytest.raises(BpwoptError) as raised:
        list(RayExecutor(cluster).map(measure_tensor, [task]))
    assert str(raised.value) == f"{demo_model_path} has no tensor blk.99.no_such.weight"


def test_an_unreachable_cluster_is_one_line(demo_model_path, tmp_path, capsys):
    ray.shutdown()  # a driver still connected to the test cluster would not try the new address
    argv = ["--allow-requantize", "--dry-run", "--quiet", "--target-bpw", "6", "--state-file",
            str(tmp_path / "s.bpw_state"), "--ray", f"127.0.0.1:{_free_port()}", str(demo_model_path)]  # fmt: skip
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert "cannot connect to the Ray cluster at 127.0.0.1:" in error and error.count("\n") == 1
