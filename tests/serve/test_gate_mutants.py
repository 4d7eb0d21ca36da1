"""The request gate as a client and an operator see it: the request id echoed or made, the worker header,
the exact 401 and 413 answers (code, message, request id, ``Connection: close`` only when a body was
coming), a Content-Length equal to the limit let through, what ``kiln.authorized`` says to the routes,
and the latency recorded with the status sent."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from kiln.serve.middleware import RequestGate

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

KEY = "k3y"


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, int]] = []

    def observe_latency(self, model: str, route: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.seen.append((model, route, status))


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"rid": request.scope["kiln.request_id"], "authorized": request.scope["kiln.authorized"],
                         "body": len(body)}, status_code=201)


def client(api_key: str | None = None, limit: int = 10, worker: str | None = None) -> tuple[TestClient, Recorder]:
    metrics = Recorder()
    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/healthz", echo)])
    app.add_middleware(RequestGate, limit=limit, metrics=metrics, models={"digits"}, api_key=api_key, worker=worker)
    return TestClient(app), metrics


def test_a_well_formed_request_id_is_echoed_to_the_route_and_the_client() -> None:
    c, _ = client()
    resp = c.get("/echo", headers={"X-Request-ID": "abc-123.x:y_z"})
    assert resp.json()["rid"] == "abc-123.x:y_z" and resp.headers["x-request-id"] == "abc-123.x:y_z"


@pytest.mark.parametrize("rid", [None, "", "bad id", "x" * 129])
def test_a_missing_or_malformed_request_id_is_replaced(rid: str | None) -> None:
    c, _ = client()
    headers = {} if rid is None else {"X-Request-ID": rid}
    new = c.get("/echo", headers=headers).headers["x-request-id"]
    again = c.get("/echo", headers=headers)
    assert new and new != rid and again.json()["rid"] == again.headers["x-request-id"] != new


def test_worker_header_only_when_named() -> None:
    assert client(worker="w3")[0].get("/echo").headers["x-kiln-worker"] == "w3"
    assert "x-kiln-worker" not in client()[0].get("/echo").headers


def test_without_a_key_every_caller_is_authorized() -> None:
    assert client()[0].get("/echo").json()["authorized"] is True


def test_with_a_key_the_route_sees_who_holds_it() -> None:
    c, _ = client(api_key=KEY)
    assert c.get("/echo", headers={"Authorization": f"Bearer {KEY}"}).json()["authorized"] is True
    assert c.get("/healthz", headers={"Authorization": f"Bearer {KEY}"}).json()["authorized"] is True
    assert c.get("/healthz").json()["authorized"] is False
    assert c.get("/healthz", headers={"Authorization": "Bearer nope"}).json()["authorized"] is False


def test_401_body_and_headers() -> None:
    c, _ = client(api_key=KEY)
    resp = c.get("/echo", headers={"X-Request-ID": "r1"})
    assert resp.status_code == 401
    assert resp.json() == {"error": {"code": "unauthorized", "request_id": "r1",
                                     "message": "missing API key: send 'Authorization: Bearer <key>'"}}
    assert resp.headers["www-authenticate"] == "Bearer" and resp.headers.get("connection") != "close"
    resp = c.post("/echo", content=b"12345", headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401 and resp.json()["error"]["message"] == "wrong API key"
    assert resp.headers["connection"] == "close"
    assert c.post("/echo", content=b"", headers={"Authorization": "Bearer nope"}).headers.get("connection") != "close"


def test_content_length_at_the_limit_is_let_through_one_over_is_413() -> None:
    c, _ = client(limit=10)
    ok = c.post("/echo", content=b"x" * 10)
    assert ok.status_code == 201 and ok.json()["body"] == 10
    resp = c.post("/echo", content=b"x" * 11, headers={"X-Request-ID": "r2"})
    assert resp.status_code == 413 and resp.headers["connection"] == "close"
    assert resp.json() == {"error": {"code": "body_too_large", "request_id": "r2",
                                     "message": "request body of 11 bytes is over the limit of 10 bytes"}}


def test_malformed_content_length_is_413() -> None:
    c, _ = client(limit=10)
    resp = c.post("/echo", content=b"x", headers={"Content-Length": "1x"})
    assert resp.status_code == 413
    assert resp.json()["error"]["message"] == "request body of 1x bytes is over the limit of 10 bytes"


def test_latency_is_recorded_with_the_status_sent() -> None:
    c, metrics = client(api_key=KEY)
    c.get("/echo", headers={"Authorization": f"Bearer {KEY}"})
    c.get("/echo")
    assert [s[2] for s in metrics.seen] == [201, 401]
