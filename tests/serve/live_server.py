"""A real uvicorn server process configured as ``kiln serve`` configures it (tests/serve/fake_serve.py):
the ``serve`` fixture starts one per call, ``raw_request`` talks to it over a plain socket."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).parent


@dataclass
class Live:
    proc: subprocess.Popen[str]
    url: str
    host: str
    port: int
    lines: list[str] = field(default_factory=list)

    def status(self, key: str) -> int:
        """A field of /proc/PID/status in bytes (VmRSS, VmHWM)."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024  # type: ignore[union-attr]

    def log(self) -> str:
        return "".join(self.lines)


def start_live(root: Path, **env: str) -> Live:
    """Start tests/serve/fake_serve.py (the real serving stack over a fake backend) writing under ``root``,
    with ``env`` added to the environment; returns once /readyz answers 200. Stop it with ``stop_live``."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "KILN_MAX_DELAY_MS": "1", **env}
    proc = subprocess.Popen([sys.executable, str(HERE / "fake_serve.py"), str(root)],
                            stderr=subprocess.PIPE, text=True, env=full, cwd=HERE)
    live = Live(proc, "", "", 0)
    found = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            live.lines.append(line)
            m = re.search(r"serving on (http://([\d.]+):(\d+))", line)
            if m:
                live.url, live.host, live.port = m.group(1), m.group(2), int(m.group(3))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert found.wait(60), live.log()
        end = time.monotonic() + 60
        while True:  # the socket is bound before uvicorn listens on it
            try:
                if httpx.get(live.url + "/readyz", timeout=5).status_code == 200:
                    return live
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < end, live.log()
            time.sleep(0.05)
    except BaseException:
        stop_live(live)
        raise


def stop_live(live: Live) -> None:
    if live.proc.poll() is None:
        live.proc.kill()
        live.proc.wait()


@pytest.fixture(name="serve")
def serve_fixture(tmp_path: Path) -> Iterator[Callable[..., Live]]:
    """``serve(**env)``: a started server (``start_live``), stopped after the test."""
    started: list[Live] = []

    def start(**env: str) -> Live:
        started.append(start_live(tmp_path / f"s{len(started)}", **env))
        return started[-1]

    yield start
    for live in started:
        stop_live(live)


def raw_request(live: Live, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[bytes, float]:
    """Send ``head`` (and ``body``, which may be less than Content-Length), return what the server
    answers (until it closes or 0.2 s after the head of the answer) and the seconds to its first byte."""
    with socket.create_connection((live.host, live.port), timeout=timeout) as s:
        t0 = time.perf_counter()
        s.sendall(head + body)
        first = s.recv(65536)
        elapsed = time.perf_counter() - t0
        s.settimeout(0.2)
        chunks = [first]
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks), elapsed


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


