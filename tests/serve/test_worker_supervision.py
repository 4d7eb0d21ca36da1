"""`kiln serve --workers 2` as a user runs it: gRPC served by both workers on one port (tritonclient), a
worker killed under load or exiting on its own is replaced with its reason logged and a growing back-off
while the others keep answering and /readyz says so, and a gRPC port in use is a one-line error."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import kiln_serve, wait_ready
from .test_workers import _body, _linear_bundle, post_until

pytest.importorskip("onnxruntime")
grpcclient = pytest.importorskip("tritonclient.grpc")

PREDICT = "/v1/models/digits/predict"
Running = tuple[subprocess.Popen[str], str, list[str]]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def _cmd(bundle: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kiln.cli", "serve", str(bundle), "--name", "digits", "--port", "0",
            "--backend", "onnxrt", "--drain-s", "1", *extra]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return _linear_bundle(tmp_path / "digits").root


@contextlib.contextmanager
def _two_workers(bundle: Path, *extra: str) -> Iterator[Running]:
    with kiln_serve(_cmd(bundle, "--workers", "2", *extra), _env()) as running:
        proc, url, lines = running
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_ready(client, proc, lines, 120)
        yield running
    assert not [line for line in lines if "Traceback" in line], "".join(lines)


@pytest.fixture
def workers(bundle: Path) -> Iterator[Running]:
    with _two_workers(bundle) as running:
        yield running


@pytest.fixture
def grpc_workers(bundle: Path) -> Iterator[Running]:
    with _two_workers(bundle, "--grpc-port", "0") as running:
        yield running


def _wait_for(predicate: object, what: str, lines: list[str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}:\n" + "".join(lines)
        time.sleep(0.05)


def _grpc_infer(port: int) -> np.ndarray:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        x = grpcclient.InferInput("images", [1, 1, 28, 28], "FP32")
        x.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
        return client.infer("digits", [x]).as_numpy("logits")
    finally:
        client.close()


def test_both_workers_serve_grpc_on_one_port(grpc_workers: Running) -> None:
    proc, url, lines = grpc_workers
    ports = {int(m.group(1)) for line in lines
             if (m := re.search(r"serving gRPC \(KServe v2\) on \S+:(\d+)", line))}
    assert len(ports) == 1 and sum("serving gRPC" in line for line in lines) == 2, "".join(lines)
    port = ports.pop()
    for _ in range(8):  # a new channel (connection) each time: the kernel picks a worker for each
        assert _grpc_infer(port).shape == (1, 10)
    # A replacement worker listens on the same gRPC port (the parent held it meanwhile).
    os.kill(_pids(lines)[0], signal.SIGKILL)
    _wait_for(lambda: sum("serving gRPC" in line for line in lines) == 3, "the replacement's gRPC server",
              lines)
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, proc, lines, 120)
    for _ in range(8):
        assert _grpc_infer(port).shape == (1, 10)
    assert proc.poll() is None


def _pids(lines: list[str]) -> list[int]:
    started = [int(p) for line in lines if (m := re.search(r"started \d+ workers: pids ([\d, ]+)", line))
               for p in m.group(1).split(", ")]
    started += [int(m.group(1)) for line in lines if (m := re.search(r"started worker (\d+) in place", line))]
    return started


def test_a_worker_killed_under_load_is_replaced_with_a_back_off_while_the_service_answers(
    workers: Running,
) -> None:
    proc, url, lines = workers
    statuses: list[int | str] = []
    stop = threading.Event()
    # A transport error is a request the killed worker had accepted: the client goes on.
    threads = [threading.Thread(target=post_until, args=(url, statuses, stop, False)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(statuses) >= 20, "load", lines)
        victim = _pids(lines)[0]
        os.kill(victim, signal.SIGKILL)
        at_kill = len(statuses)
        with httpx.Client(base_url=url, timeout=30) as client:
            # Readiness says a worker is missing until its replacement is ready; requests keep being served.
            _wait_for(lambda: client.get("/readyz").status_code == 503, "/readyz 503", lines)
            _wait_for(lambda: len(_pids(lines)) == 3, "a new worker", lines)
            wait_ready(client, proc, lines, 120)
        _wait_for(lambda: len(statuses) >= at_kill + 40, "answers after the kill", lines)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    after = statuses[at_kill:]
    assert after.count(200) >= 40, after
    # at most the requests in flight on the victim
    assert len([s for s in statuses if s != 200]) <= 4, statuses
    log = "".join(lines)
    assert f"worker {victim} was killed by SIGKILL" in log and "starting a new one in 0.5 s" in log, log
    assert proc.poll() is None

    # The replacement dies at once too: the next restart waits longer (a crash loop does not spin).
    replacement = _pids(lines)[2]
    os.kill(replacement, signal.SIGKILL)
    _wait_for(lambda: f"worker {replacement} was killed by SIGKILL" in "".join(lines), "the second death",
              lines)
    assert "starting a new one in 1.0 s" in "".join(lines), "".join(lines)
    _wait_for(lambda: len(_pids(lines)) == 4, "another worker", lines)
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, proc, lines, 120)
    pids = set(_pids(lines)) - {victim, replacement}
    answered: set[int] = set()
    for _ in range(200):
        if answered == pids:
            break
        with httpx.Client(base_url=url, timeout=30) as fresh:
            answered.add(int(fresh.post(PREDICT, json=_body()).headers["x-kiln-worker"]))
    assert answered == pids, (answered, pids)


def test_a_worker_that_exits_with_status_0_is_replaced(workers: Running) -> None:
    proc, url, lines = workers
    victim = _pids(lines)[1]
    os.kill(victim, signal.SIGTERM)  # it drains and exits 0, as if something asked it alone to stop
    _wait_for(lambda: len(_pids(lines)) == 3, "a new worker", lines)
    assert f"worker {victim} exited with status 0" in "".join(lines), "".join(lines)
    with httpx.Client(base_url=url, timeout=30) as client:
        wait_ready(client, proc, lines, 120)
        assert client.post(PREDICT, json=_body()).status_code == 200
    proc.send_signal(signal.SIGTERM)  # the parent still stops cleanly
    assert proc.wait(60) == 0, "".join(lines)


@pytest.mark.parametrize("count", ["1", "2"])
def test_a_grpc_port_in_use_is_a_one_line_error_with_status_2(bundle: Path, count: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(_cmd(bundle, "--workers", count, "--grpc-port", str(port)), env=_env(),
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"kiln serve: error: cannot listen for gRPC (--grpc-port) on 127.0.0.1:{port}: "
                      "Address already in use"], done.stderr
    assert "Traceback" not in done.stderr
