"""Slow and numerous peers against the server ``kiln serve`` runs (its protocol class and settings, in a
real process): a request head that trickles in or never comes is closed at its deadline, connections
over the cap get a fast 503 while health probes still answer, and the open-file limit is lifted so a
flood of slow clients under a 1,024 soft limit leaves good clients served."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .live_server import Live, serve_fixture  # noqa: F401 (a fixture)
from .test_http_framing import read_response

PREDICT = "/v1/models/digits/predict"


def trickle_until_answered(sock: socket.socket, head: bytes, period: float, deadline: float) -> bytes:
    """Send ``head`` one byte every ``period`` seconds (never all of it in time) until the server answers
    or closes; returns what it sent back (b"" for a silent close)."""
    sock.settimeout(period)
    for i in range(len(head)):
        assert time.monotonic() < deadline, "the server never closed the slow connection"
        try:
            sock.sendall(head[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return b""
        try:
            first = sock.recv(65536)
        except TimeoutError:
            continue
        chunks = [first]
        sock.settimeout(2)
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    raise AssertionError("the whole head was sent: make it longer")


SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"


def test_a_head_trickling_in_gets_408_at_its_deadline(serve: Callable[..., Live]) -> None:
    live = serve(KILN_HEADER_TIMEOUT_S="1")
    t0 = time.monotonic()
    with socket.create_connection((live.host, live.port)) as s:
        answer = trickle_until_answered(s, SLOW_HEAD, 0.1, t0 + 30)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower()
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "header_timeout", body
    # Bytes kept coming every 0.1 s: only a deadline on the whole head ends this connection.
    assert time.monotonic() - t0 < 20


def test_a_v2_head_trickling_in_gets_408_in_the_v2_error_shape(serve: Callable[..., Live]) -> None:
    live = serve(KILN_HEADER_TIMEOUT_S="1")
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with socket.create_connection((live.host, live.port)) as s:
        answer = trickle_until_answered(s, head, 0.1, time.monotonic() + 30)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert isinstance(json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"], str)


def test_a_connection_that_never_sends_a_byte_is_closed_at_the_head_deadline(
    serve: Callable[..., Live],
) -> None:
    live = serve(KILN_HEADER_TIMEOUT_S="1")
    with socket.create_connection((live.host, live.port), timeout=30) as s:
        assert s.recv(65536) == b""  # closed without an answer: there was no request to answer


def test_a_slow_second_head_on_a_kept_alive_connection_gets_408(serve: Callable[..., Live]) -> None:
    live = serve(KILN_HEADER_TIMEOUT_S="1", KILN_KEEP_ALIVE_S="30")
    with socket.create_connection((live.host, live.port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, _ = read_response(s.makefile("rb"))
        assert status == 200 and headers.get("connection") != "close"
        answer = trickle_until_answered(s, SLOW_HEAD, 0.1, time.monotonic() + 30)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_a_slow_body_is_not_cut_by_the_head_deadline(serve: Callable[..., Live]) -> None:
    """The head deadline ends with the head: a body arriving in pieces is the body timeout's business."""
    live = serve(KILN_HEADER_TIMEOUT_S="1", KILN_BODY_TIMEOUT_S="30")
    body = b'{"images": ["' + b"A" * 40 + b'"]}'
    with socket.create_connection((live.host, live.port), timeout=30) as s:
        s.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), 10):  # 2.5 s of body, past the head deadline
            time.sleep(0.5)
            s.sendall(body[i:i + 10])
        status, _, answer = read_response(s.makefile("rb"))
    assert status == 400, answer  # 'A'*40 is not an image: the app answered, the connection was not cut


@contextlib.contextmanager
def slow_clients(live: Live, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that each sent the start of a request head and then nothing."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection((live.host, live.port), timeout=10)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def test_connections_over_the_cap_get_a_fast_503_and_health_probes_still_answer(
    serve: Callable[..., Live],
) -> None:
    live = serve(KILN_MAX_CONNECTIONS="20", KILN_HEADER_TIMEOUT_S="60")
    with slow_clients(live, 20):
        deadline = time.monotonic() + 30
        while True:  # the server accepts the slow connections in its own time
            with httpx.Client(base_url=live.url, timeout=10) as c:
                resp = c.post(PREDICT, json={"images": []})
            if resp.status_code == 503:
                break
            assert time.monotonic() < deadline, resp.text
            time.sleep(0.05)
        assert resp.headers["connection"] == "close"
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["code"] == "too_many_connections", resp.text
        with httpx.Client(base_url=live.url, timeout=10) as c:
            v2 = c.post("/v2/models/digits/infer", json={"inputs": []})
        assert v2.status_code == 503 and isinstance(v2.json()["error"], str), v2.text
        for path in ("/healthz", "/readyz"):  # on a fresh connection each, above the cap
            with httpx.Client(base_url=live.url, timeout=10) as c:
                probe = c.get(path)
            assert probe.status_code == 200, probe.text
            assert probe.headers["connection"] == "close"
    deadline = time.monotonic() + 30
    while True:  # the slow clients gone, requests are served again
        with httpx.Client(base_url=live.url, timeout=10) as c:
            resp = c.post(PREDICT, json={"images": []})
        if resp.status_code != 503:
            break
        assert time.monotonic() < deadline, resp.text
        time.sleep(0.05)
    assert resp.status_code == 400, resp.text  # no images: the app's own answer
    assert "over the limit" in live.log()  # the refusals were logged (once, not per connection)


def test_good_clients_are_served_beside_1100_slow_clients_under_a_1024_open_file_limit(
        serve: Callable[..., Live]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard open-file limit ({hard}) leaves no room above 1,024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the server process inherits
    try:
        live = serve(KILN_HEADER_TIMEOUT_S="120")
    finally:  # this process holds the 1,100 client sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    fds = Path(f"/proc/{live.proc.pid}/fd")
    with slow_clients(live, 1100):
        deadline = time.monotonic() + 15
        # accepted in the server's time
        while len(list(fds.iterdir())) < 1100 and time.monotonic() < deadline:
            time.sleep(0.1)
        ok = 0
        for _ in range(20):
            with httpx.Client(base_url=live.url, timeout=10) as c, contextlib.suppress(httpx.TransportError):
                ok += c.get("/healthz").status_code == 200
                ok += c.post(PREDICT, json={"images": []}).status_code == 400  # a new connection each
        assert ok == 40
