"""The SIGTERM drain seen by keep-alive clients, against the server ``kiln serve`` runs (a real process):
every response from the drain's start says ``Connection: close``, so clients under load reconnect while
the listener still accepts instead of meeting a reset when it closes; an idle kept-alive connection is
closed during the drain, not when the listener is already gone."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable

import httpx

from .live_server import Live, serve_fixture  # noqa: F401 (a fixture)
from .test_http_framing import read_response

PREDICT = "/v1/models/digits/predict"
IMAGE = {
    "images": ["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGM4AQAAygDJmcpdfgAAAABJRU5ErkJggg=="]
}


def test_keep_alive_clients_under_load_are_told_to_close_during_the_drain_and_see_no_reset(
        serve: Callable[..., Live]) -> None:
    live = serve(KILN_DRAIN_S="3", KILN_KEEP_ALIVE_S="30")
    statuses: list[int] = []
    errors: list[str] = []
    told: list[int] = []
    after_close: list[int] = []
    sigterm = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=live.url, timeout=30) as c:  # one pooled keep-alive connection
            end = time.monotonic() + 60
            while time.monotonic() < end:
                try:
                    resp = c.post(PREDICT, json=IMAGE)
                except httpx.TransportError as exc:
                    errors.append(repr(exc))
                    return
                statuses.append(resp.status_code)
                if sigterm.is_set() and resp.headers.get("connection") == "close":
                    told.append(1)
                    # A client told to close reconnects; the listener still accepts during the drain.
                    try:
                        after_close.append(c.post(PREDICT, json=IMAGE).status_code)
                    except httpx.TransportError as exc:
                        errors.append(repr(exc))
                    return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(statuses) < 40:
        assert time.monotonic() < deadline and not errors, errors
        time.sleep(0.01)
    sigterm.set()
    live.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert len(told) == 4, f"{len(told)} of 4 clients were told to close"
    assert set(statuses) == {200} and after_close == [200] * 4, (set(statuses), after_close)
    assert live.proc.wait(60) == 0, live.log()


def test_an_idle_kept_alive_connection_is_closed_while_the_listener_still_accepts(
    serve: Callable[..., Live],
) -> None:
    live = serve(KILN_DRAIN_S="10", KILN_KEEP_ALIVE_S="60")
    with socket.create_connection((live.host, live.port), timeout=30) as idle:
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        f = idle.makefile("rb")
        status, headers, _ = read_response(f)
        assert status == 200 and headers.get("connection") != "close"
        live.proc.send_signal(signal.SIGTERM)
        assert f.read() == b""  # the server closed it, without cutting anything
    with httpx.Client(base_url=live.url, timeout=10) as c:  # still accepting: the drain goes on
        resp = c.get("/healthz")
    assert resp.status_code == 200 and resp.json()["status"] == "stopping", resp.text
    assert resp.headers["connection"] == "close"
    assert live.proc.wait(60) == 0, live.log()


def test_clients_that_keep_connecting_through_the_drain_end_are_refused_never_reset(
    serve: Callable[..., Live],
) -> None:
    """Clients under load keep coming after the drain: once the listener is gone they are refused (they
    can retry elsewhere), but no request they sent on an accepted connection is reset or cut."""
    live = serve(KILN_DRAIN_S="2")
    body = json.dumps(IMAGE).encode()
    request = (f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    outcomes: list[str] = []
    sigterm = threading.Event()

    def client() -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                s = socket.create_connection((live.host, live.port), timeout=30)
            except ConnectionRefusedError:
                outcomes.append("refused")
                if sigterm.is_set():
                    return
                continue
            with s:
                f = s.makefile("rb")
                while True:  # keep-alive until the server says close
                    try:
                        s.sendall(request)
                        status, headers, _ = read_response(f)
                    except (ConnectionResetError, BrokenPipeError, IndexError, ValueError) as exc:
                        outcomes.append(f"cut: {exc!r}")  # reset, or closed without an answer
                        break
                    outcomes.append(str(status))
                    if headers.get("connection") == "close":
                        break

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while outcomes.count("200") < 100:
        assert time.monotonic() < deadline, outcomes[-20:]
        time.sleep(0.01)
    sigterm.set()
    live.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    assert live.proc.wait(60) == 0, live.log()
    cut = [o for o in outcomes if o.startswith("cut")]
    assert not cut, (len(cut), cut[:5])
    assert set(outcomes) <= {"200", "refused"}, set(outcomes)
    assert outcomes.count("refused") >= 16  # each client ended on a refused connection
