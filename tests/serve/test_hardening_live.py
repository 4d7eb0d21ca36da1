"""The server under attack and bad luck, as a real uvicorn process (tests/serve/fake_serve.py): decode
bombs, an unauthenticated large body, clients that hang up mid-upload, a stalled body, an oversized
head, and the drain after SIGTERM.

Time bounds are generous (a loaded 2-core machine) and, where a bound matters, set against a control
request measured in the same test.
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
import socket
import time
from collections.abc import Callable

import httpx
from PIL import Image

from tests.polling import eventually

from .conftest import png
from .live_server import Live, raw_request, serve_fixture, status_of  # noqa: F401 (a fixture)

MB = 1024 * 1024


def palette_bomb(side: int) -> bytes:
    """A palette PNG of side x side pixels: tens of KB on the wire, side**2 pixels (and ~17 bytes per
    pixel of conversions) when decoded."""
    buf = io.BytesIO()
    Image.new("P", (side, side), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def control(live: Live) -> float:
    """Seconds to the first byte of a /healthz answer over a fresh connection: the machine's pace now."""
    return min(raw_request(live, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")[1] for _ in range(3))


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "kilnboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + f + b"\r\n" for i, f in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_decode_bombs_are_refused_from_their_headers(serve: Callable[..., Live]) -> None:
    live = serve()
    bomb = palette_bomb(6000)  # 36 Mpx, under the 40 Mpx per-image limit
    assert len(bomb) < 300_000
    body, ctype = multipart([bomb] * 8)
    rss_before = live.status("VmRSS")
    base = control(live)
    t0 = time.perf_counter()
    resp = httpx.post(live.url + "/v1/models/digits/predict", content=body, headers={"content-type": ctype},
                      timeout=30)
    elapsed = time.perf_counter() - t0
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "too_many_pixels"
    assert elapsed < max(1.0, 50 * base), (elapsed, base)
    assert live.status("VmHWM") < 200 * MB, live.status("VmHWM")
    assert live.status("VmRSS") - rss_before < 50 * MB

    # One bomb within the pixel budget is refused from its header too: it decodes to ~1,000 pixels per byte.
    t0 = time.perf_counter()
    resp = httpx.post(live.url + "/v1/models/digits/predict", timeout=30,
                      files={"file": ("one.png", bomb, "image/png")})
    assert resp.status_code == 400 and "decompression bomb" in resp.json()["error"]["message"], resp.text
    assert time.perf_counter() - t0 < max(1.0, 50 * base)
    assert live.status("VmHWM") < 200 * MB, live.status("VmHWM")


def test_large_image_within_the_limits_is_decoded_and_its_memory_returned(serve: Callable[..., Live]) -> None:
    # With the bomb guard off, one large image within the budget is decoded (in a worker thread), and
    # its memory goes back.
    live = serve(KILN_MAX_PIXELS_PER_BYTE="1e9")
    rss_before = live.status("VmRSS")
    resp = httpx.post(live.url + "/v1/models/digits/predict", timeout=60,
                      files={"file": ("one.png", palette_bomb(3000), "image/png")})
    assert resp.status_code == 200, resp.text
    assert resp.json()["predictions"][0]["width"] == 3000
    assert live.status("VmRSS") - rss_before < 60 * MB, (live.status("VmRSS") - rss_before) / MB


def test_unauthenticated_body_is_refused_before_it_is_read(serve: Callable[..., Live]) -> None:
    live = serve(KILN_API_KEY="s3cret")
    base = control(live)
    head = (b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(10 * MB).encode() + b"\r\n\r\n")
    answer, elapsed = raw_request(live, head, b'{"inputs": [' + b"0," * 32_000)  # 64 KB of the 10 MB
    assert status_of(answer) == 401, answer[:300]
    assert b"connection: close" in answer.lower()
    assert elapsed < max(0.2, 10 * base), (elapsed, base)
    ok = httpx.get(live.url + "/v2/models/digits", headers={"Authorization": "Bearer s3cret"}, timeout=10)
    assert ok.status_code == 200


def test_clients_hanging_up_mid_upload_are_499_without_tracebacks(serve: Callable[..., Live]) -> None:
    live = serve()
    body, ctype = multipart([png()] * 4)
    heads = [
        f"POST /v1/models/digits/predict HTTP/1.1\r\nhost: x\r\ncontent-type: {ctype}\r\n"
        f"content-length: {len(body) + 100_000}\r\n\r\n".encode() + body,
        b"POST /v1/models/digits/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 100000\r\n\r\n{"images": ["iVBOR',
        b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 100000\r\n\r\n{"inputs": [{"name": "images", "data": [0,0,',
    ]
    total = 0
    for round_ in range(20):
        socks = []
        for i in range(50):
            s = socket.create_connection((live.host, live.port), timeout=10)
            s.sendall(heads[(round_ * 50 + i) % len(heads)])
            socks.append(s)
        time.sleep(0.1)  # the server has read the heads and waits for the rest of each body
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            s.close()
        total += len(socks)
    assert total == 1000

    def gone() -> float:  # the requests recorded as abandoned by their client (499)
        nonlocal metrics
        metrics = httpx.get(live.url + "/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(r'^kiln_request_duration_seconds_count\{.*status="499"\} '
                                                r'(\S+)',
                                                metrics, re.M))

    metrics = ""
    assert eventually(lambda: gone() >= 900, timeout=30, interval=0.1), metrics
    # route labels hold braces ("/v1/models/{name}/predict"): match within the line, not up to a brace
    assert not re.search(r'^kiln_request_duration_seconds_count\{.*status="5\d\d"', metrics, re.M), metrics
    assert not [line for line in live.lines if line.startswith("ERROR") or "Traceback" in line], live.log()[
        -3000:
    ]
    assert (
        httpx.post(
            live.url + "/v1/models/digits/predict", files={"file": ("a.png", png(), "image/png")}
        ).status_code
        == 200
    )


def test_stalled_body_is_408(serve: Callable[..., Live]) -> None:
    live = serve(KILN_BODY_TIMEOUT_S="0.5")
    head = (b"POST /v1/models/digits/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n")
    answer, elapsed = raw_request(live, head, b'{"images":', timeout=30)
    assert status_of(answer) == 408, answer[:300]
    assert b'"request_timeout"' in answer and b"connection: close" in answer.lower()
    assert 0.4 < elapsed < 15, elapsed


def test_oversized_head_is_refused(serve: Callable[..., Live]) -> None:
    live = serve(KILN_MAX_HEADER_BYTES="16384")
    ok, _ = raw_request(live, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 8000 + b"\r\n\r\n")
    assert status_of(ok) == 200
    # 20 KB of a head that never ends: read by the server in one go, so its answer is not lost to a reset
    answer, _ = raw_request(live, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 20_000)
    assert status_of(answer) in (400, 431), answer[:300]
    # 64 MiB of header: the server closes the connection long before it is all sent
    sent = 0
    with (socket.create_connection((live.host, live.port), timeout=10) as s,
          contextlib.suppress(BrokenPipeError, ConnectionResetError)):
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: ")
        for _ in range(64 * 16):
            s.sendall(b"a" * 65536)
            sent += 65536
    assert sent < 32 * MB, sent
    assert live.status("VmHWM") < 200 * MB
    assert httpx.get(live.url + "/healthz", timeout=10).status_code == 200


def test_readyz_is_503_while_draining_after_sigterm(serve: Callable[..., Live]) -> None:
    live = serve(KILN_DRAIN_S="3")
    with httpx.Client(base_url=live.url, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
        t0 = time.monotonic()
        live.proc.send_signal(signal.SIGTERM)
        assert eventually(lambda: client.get("/readyz").status_code == 503, timeout=30, interval=0.05)
        seen = [503]
        while time.monotonic() - t0 < 2.0:
            resp = client.get("/readyz")
            seen.append(resp.status_code)
            assert resp.status_code == 503 and "shutting down" in resp.text, resp.text
            assert client.get("/healthz").json()["status"] == "stopping"
            time.sleep(0.1)
        assert seen
        predict = client.post("/v1/models/digits/predict", files={"file": ("a.png", png(), "image/png")})
        assert predict.status_code == 200  # still served while draining
    assert live.proc.wait(30) == 0, live.log()
    assert time.monotonic() - t0 >= 2.9
