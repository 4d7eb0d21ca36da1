"""HTTP framing through the server ``kiln serve`` runs (its protocol class and settings, in a real
process): the head limit counts request line and headers only, whatever the client's writes look like
on the wire: one write, 1-byte writes, 1 KiB writes, a write that ends inside the body, keep-alive and
pipelined requests, bodies from 1 KB to 15 MB. Photo-size uploads used to be refused with 431 when a
TCP read completed a body larger than the head limit."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pytest
from PIL import Image

from .live_server import Live, serve_fixture, start_live, stop_live  # noqa: F401 (a fixture)

KB = 1024


def noise_png(side: int, level: int, seed: int = 0) -> bytes:
    """A grayscale PNG of noise around ``level`` (incompressible: about side**2 bytes). The test server's
    backend answers the image's mean brightness in tenths, so level 120 is class '4'."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(level - 20, level + 21, size=(side, side), dtype=np.int16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def multipart_request(blob: bytes, path: str = "/v1/models/digits/predict", close: bool = False) -> bytes:
    boundary = "kilnframing"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="photo.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + blob + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: framing-test\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode()
    return head + body


def read_response(f: io.BufferedReader) -> tuple[int, dict[str, str], bytes]:
    status = int(f.readline().split(b" ", 2)[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers.get("content-length", "0")))


def send(sock: socket.socket, data: bytes, pattern: str) -> None:
    """Write ``data`` as one write, 1-byte writes, 1 KiB writes, or a write that ends inside the body
    (then a pause long enough for the server to read it alone, then the rest)."""
    if pattern == "one":
        sock.sendall(data)
    elif pattern in ("1B", "1KiB"):
        step = 1 if pattern == "1B" else KB
        for i in range(0, len(data), step):
            sock.sendall(data[i:i + step])
    elif pattern == "split-body":
        cut = data.index(b"\r\n\r\n") + 4 + 100
        sock.sendall(data[:cut])
        time.sleep(0.05)
        sock.sendall(data[cut:])
    else:
        raise ValueError(pattern)


def exchange(live: Live, requests: Iterable[bytes], pattern: str) -> list[tuple[int, dict[str, str], bytes]]:
    """Send each request on one keep-alive connection (the next after the previous answer)."""
    out = []
    with socket.create_connection((live.host, live.port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = sock.makefile("rb")
        for request in requests:
            send(sock, request, pattern)
            out.append(read_response(f))
    return out


def top_label(body: bytes) -> str:
    return json.loads(body)["predictions"][0]["top_k"][0]["label"]


# 1 KB to 15 MB: a digit-sized PNG, the 120 KB photo that used to get 431, a 1 MB and a 15 MB one.
SIZES = {"1KB": 32, "120KB": 350, "1MB": 1024, "15MB": 3900}
PATTERNS = ["one", "1B", "1KiB", "split-body"]


@pytest.fixture(scope="module")
def uploads_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One server for the upload matrix (each case is a fresh connection; the server keeps no state)."""
    live = start_live(tmp_path_factory.mktemp("uploads"), KILN_MAX_BODY_BYTES=str(20 * 1024 * KB))
    yield live
    stop_live(live)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("size", list(SIZES))
def test_uploads_of_every_size_and_write_pattern_are_answered(uploads_server: Live, size: str,
                                                              pattern: str) -> None:
    if pattern == "1B" and SIZES[size] > 400:
        pytest.skip("1-byte writes of megabytes take minutes; 120 KB already spans many TCP reads")
    live = uploads_server
    blob = noise_png(SIZES[size], 120, seed=len(size))
    # keep-alive: the same connection carries a second upload after the first answer
    answers = exchange(live, [multipart_request(blob), multipart_request(blob)], pattern)
    for status, _headers, body in answers:
        assert status == 200, body[:300]
        assert top_label(body) == "4"


def test_pipelined_uploads_in_one_write_are_answered_in_order(serve: Callable[..., Live]) -> None:
    live = serve()
    dark, bright = noise_png(350, 30, seed=1), noise_png(350, 220, seed=2)  # classes '1' and '8'
    with socket.create_connection((live.host, live.port), timeout=60) as sock:
        sock.sendall(
            multipart_request(dark) + multipart_request(bright) + multipart_request(dark, close=True)
        )
        f = sock.makefile("rb")
        answers = [read_response(f) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 200], answers
    assert [top_label(body) for _, _, body in answers] == ["1", "8", "1"]


@pytest.mark.parametrize("pattern", ["one", "1KiB", "1B"])
def test_head_limit_counts_the_head_only(serve: Callable[..., Live], pattern: str) -> None:
    live = serve(KILN_MAX_HEADER_BYTES="4096")
    blob = noise_png(200, 120)  # a 40 KB body: ten times the head limit
    pad = b"x-pad: " + b"a" * 3000 + b"\r\n"  # a 3 KB header keeps the head under 4 KiB
    request = multipart_request(blob)
    request = request.replace(b"\r\n\r\n", b"\r\n" + pad + b"\r\n", 1)
    assert exchange(live, [request, request], pattern)[1][0] == 200
    # the same request with a head over the limit is refused, however it is written, before the app sees it
    over = request.replace(b"x-pad: ", b"x-pad: " + b"b" * 2000, 1)
    with socket.create_connection((live.host, live.port), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed while still writing
            send(sock, over, pattern)
        status, headers, body = read_response(sock.makefile("rb"))
    assert status == 431, body
    assert headers.get("connection") == "close"
    assert json.loads(body)["error"]["code"] == "header_too_large"
    metrics = exchange(live, [b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"], "one")[0][2].decode()
    predicted = [line for line in metrics.splitlines()
                 if line.startswith("kiln_request_duration_seconds_count") and "predict" in line]
    assert sum(float(line.split()[-1]) for line in predicted) == 2  # the refused one never ran


def test_head_over_the_limit_on_a_v2_path_is_refused_in_the_v2_error_shape(
    serve: Callable[..., Live],
) -> None:
    live = serve(KILN_MAX_HEADER_BYTES="4096")
    head = b"GET /v2/models/digits HTTP/1.1\r\nHost: x\r\nx-pad: " + b"a" * 5000 + b"\r\n\r\n"
    with socket.create_connection((live.host, live.port), timeout=30) as sock:
        sock.sendall(head)
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 431
    assert isinstance(json.loads(body)["error"], str)


def test_a_malformed_chunked_body_is_recorded_with_the_status_the_client_got(
    serve: Callable[..., Live],
) -> None:
    live = serve()
    head = (b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection((live.host, live.port), timeout=30) as sock:
        sock.sendall(head + b"4\r\n{\"im\r\n")
        time.sleep(0.05)  # the app is reading the body when the bad chunk comes
        sock.sendall(b"zz\r\nnot a chunk\r\n")
        status, _, _ = read_response(sock.makefile("rb"))
    assert status == 400
    deadline = time.monotonic() + 10
    while True:  # the app notices the end of its request after the client has its answer
        metrics = exchange(live, [b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"], "one")[0][2].decode()
        recorded = [line for line in metrics.splitlines()
                    if line.startswith("kiln_request_duration_seconds_count") and "predict" in line]
        if recorded or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert recorded and all('status="400"' in line for line in recorded), recorded
