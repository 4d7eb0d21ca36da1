"""The body size limit against a real uvicorn server and a real socket: a chunked body whose every
chunk is small but whose total is over the limit is refused with 413 (the test client would hand the
whole body over at once, so only a socket shows that the count is cumulative)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.serve.app import create_app
from kiln.serve.settings import Settings

from .conftest import FakeBackend, make_bundle, png

uvicorn = pytest.importorskip("uvicorn")  # a third-party server, not part of kiln

LIMIT = 4096
CHUNK = 512  # several chunks would have to arrive together before one read could pass LIMIT


@pytest.fixture
def server(tmp_path: Path) -> Iterator[int]:
    """A kiln app under uvicorn on a socket bound to port 0 and handed over: no race for the port."""
    app = create_app([("digits", make_bundle(tmp_path / "digits"))],
                     Settings(max_body_bytes=LIMIT, max_delay_ms=1.0),
                     loader=lambda bundle, _s: FakeBackend(bundle))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def _post_chunked(port: int, chunks: list[bytes], pause: float = 0.005) -> tuple[int, bytes]:
    """POST ``chunks`` with Transfer-Encoding: chunked, one send per chunk; return (status, raw reply)."""
    boundary = "kilnboundary"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(
            b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
        )
        try:
            for chunk in chunks:
                conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                time.sleep(pause)
            conn.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                data = conn.recv(65536)
                if not data:
                    break
                reply += data
        except ConnectionResetError:
            pass
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply.split(b" ", 2)[1]), reply


def _multipart(image: bytes, boundary: str = "kilnboundary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()


def test_streamed_body_over_the_limit_in_small_chunks_is_413(server: int) -> None:
    body = _multipart(b"\x89PNG" + bytes(8 * LIMIT))
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    assert all(len(c) <= CHUNK for c in chunks) and len(body) > 4 * LIMIT
    status, reply = _post_chunked(server, chunks)
    assert status == 413, reply[:300]


def test_streamed_body_under_the_limit_is_served(server: int) -> None:
    body = _multipart(png())
    assert len(body) < LIMIT
    chunks = [body[i : i + 64] for i in range(0, len(body), 64)]
    status, reply = _post_chunked(server, chunks, pause=0.0)
    assert status == 200, reply[:300]
