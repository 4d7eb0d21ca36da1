"""Every error on a /v2 path is the protocol's ``{"error": "<message>"}``, whichever layer refuses the
request (the gate's 401, 413, 408 and 415, routing's 404 and 405, the handlers' 400), so that Triton's
and KServe's clients report the message instead of failing to format a dict; checked with tritonclient
and raw requests against the server ``kiln serve`` runs."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest

from .live_server import Live, serve_fixture  # noqa: F401 (a fixture)

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "s3cret"


def v2_error(resp: httpx.Response) -> str:
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return str(body["error"])


def digit_input(n: int = 1) -> httpclient.InferInput:
    inp = httpclient.InferInput("images", [n, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(np.zeros((n, 1, 28, 28), np.float32), binary_data=True)
    return inp


def refused(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


@pytest.fixture
def live(serve: Callable[..., Live]) -> Live:
    return serve(KILN_API_KEY=KEY, KILN_MAX_BODY_BYTES="20000", KILN_BODY_TIMEOUT_S="0.5")


@pytest.fixture
def client(live: Live) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(f"{live.host}:{live.port}")
    yield c
    c.close()


# tritonclient adds its own headers to the dict it is given: pass it a copy
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_tritonclient_reports_the_gate_refusals(client: httpclient.InferenceServerClient) -> None:
    exc = refused(lambda: client.infer("digits", [digit_input()]))
    assert exc.status() == "401" and exc.message() == "missing API key: send 'Authorization: Bearer <key>'"
    # 25 KB over a 20 KB limit
    exc = refused(lambda: client.infer("digits", [digit_input(8)], headers=dict(AUTH)))
    assert exc.status() == "413" and exc.message().startswith("request body of ")
    assert client.infer("digits", [digit_input()], headers=dict(AUTH)).as_numpy("logits").shape == (1, 10)


def test_streamed_body_over_the_limit_is_413_in_the_v2_shape(live: Live) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b"0" * 1000

    resp = httpx.post(f"{live.url}/v2/models/digits/infer", content=chunks(), headers=AUTH)
    assert resp.status_code == 413
    assert "over the limit of 20000 bytes" in v2_error(resp)


def test_stalled_body_is_408_in_the_v2_shape(live: Live) -> None:
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Length: 100\r\n\r\n").encode()
    with socket.create_connection((live.host, live.port), timeout=30) as sock:
        sock.sendall(head + b'{"inputs"')
        answer = sock.makefile("rb").read()
    status = int(answer.split(b" ", 2)[1])
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert status == 408 and isinstance(body["error"], str) and "0.5 s" in body["error"], answer


def test_unsupported_body_encoding_is_415_in_the_v2_shape(live: Live) -> None:
    resp = httpx.post(f"{live.url}/v2/models/digits/infer", content=b"x",
                      headers={**AUTH, "Content-Encoding": "br"})
    assert resp.status_code == 415
    assert (
        v2_error(resp)
        == "Content-Encoding 'br' is not supported for request bodies; send gzip, deflate or identity"
    )


def test_routing_and_handler_errors_are_in_the_v2_shape(live: Live) -> None:
    for method, path, status in [("GET", "/v2/models/digits/infer", 405), ("GET", "/v2/nothing/here", 404),
                                 ("POST", "/v2/models/digits/infer", 400), ("GET", "/v2/models/nope", 404)]:
        resp = httpx.request(method, live.url + path, headers=AUTH,
                             content=b"{}" if method == "POST" else None)
        assert resp.status_code == status, (path, resp.text)
        v2_error(resp)
    # /v1 keeps kiln's own shape
    assert set(httpx.get(f"{live.url}/v1/models/nope", headers=AUTH).json()["error"]) == {
        "code",
        "message",
        "request_id",
    }
