"""The request gate as a client and an operator see it: the request id echoed or made, the worker header,
the exact 401 and 413 answers (code, message, request id, ``Connection: close`` only when a body was
coming), a Content-Length equal to the limit let through, what ``kiln.authorized`` says to the routes,
and the latency recorded with the status sent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from kiln.serve.errors import ApiError, install
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
    return JSONResponse({"rid": request.scope["kiln.request_id"],
                         "authorized": request.scope["kiln.authorized"],
                         "body": len(body)}, status_code=201)


def client(api_key: str | None = None, limit: int = 10,
           worker: str | None = None) -> tuple[TestClient, Recorder]:
    metrics = Recorder()
    app = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]), Route("/healthz", echo)])
    app.add_middleware(RequestGate, limit=limit, metrics=metrics, models={"digits"}, api_key=api_key,
                       worker=worker)
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
    assert (
        c.post("/echo", content=b"", headers={"Authorization": "Bearer nope"}).headers.get("connection")
        != "close"
    )


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


# ---- the gate driven as an ASGI server drives it: body chunks, stalls, hang-ups ---------------------

class Timed(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def observe_latency(self, model: str, route: str, status: int, seconds: float) -> None:
        super().observe_latency(model, route, status, seconds)
        self.seconds.append(seconds)


def http_scope(path: str = "/x", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or [], "query_string": b"",
            "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("c", 1),
            "root_path": ""}


Step = dict[str, Any] | float | None  # a message, a pause in seconds before the next, or None: never again


def script(*steps: Step) -> Callable[[], Awaitable[dict[str, Any]]]:
    queue = list(steps)

    async def receive() -> dict[str, Any]:
        while queue:
            step = queue.pop(0)
            if step is None:
                await asyncio.Event().wait()
            if isinstance(step, float):
                await asyncio.sleep(step)
                continue
            return step
        return {"type": "http.disconnect"}

    return receive


def run_gate(app: Any, scope: dict[str, Any], receive: Any, **gate: Any) -> tuple[list[dict[str, Any]], Timed,
                                                                                  BaseException | None]:
    """Run one request through the gate; (messages sent, metrics, the exception that came out or None)."""
    metrics = Timed()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> BaseException | None:
        g = RequestGate(app, limit=gate.pop("limit", 10), metrics=metrics, models={"digits"}, **gate)
        try:
            await asyncio.wait_for(g(scope, receive, send), 5.0)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            return exc
        return None

    return sent, metrics, asyncio.run(main())


async def read_all(receive: Callable[[], Awaitable[dict[str, Any]]]) -> bytes:
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if m["type"] != "http.request" or not m.get("more_body", False):
            return body


def answering(status: int = 200) -> Callable[..., Awaitable[None]]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await read_all(receive)
        await send({"type": "http.response.start", "status": status})  # no "headers" key: it is optional
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_other_scopes_pass_through_untouched() -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(_: Any) -> None: ...

    scope = {"type": "lifespan"}
    gate = RequestGate(app, limit=1, metrics=Recorder(), models=set())
    asyncio.run(gate(scope, receive, send))
    assert seen == [(scope, receive, send)] and "kiln.request_id" not in scope


def test_headers_added_to_an_answer_without_headers_in_lower_case() -> None:
    sent, metrics, exc = run_gate(answering(), http_scope(headers=[(b"x-request-id", b"r1")]),
                                  script({"type": "http.request", "body": b"abc"}), worker="w1")
    assert exc is None
    assert sent[0]["headers"] == [(b"x-request-id", b"r1"), (b"x-kiln-worker", b"w1")]
    assert metrics.seen == [("", "unmatched", 200)] and 0 <= metrics.seconds[0] < 5


def test_a_body_streamed_over_the_limit_is_413_naming_the_limit() -> None:
    sent, metrics, exc = run_gate(answering(), http_scope(), script(
        {"type": "http.request", "body": b"x" * 6, "more_body": True},
        {"type": "http.request", "body": b"x" * 5, "more_body": False}), limit=10)
    assert isinstance(exc, ApiError) and sent == []
    assert (exc.status_code, exc.code, exc.detail, exc.headers) == (
        413, "body_too_large", "request body of more than 10 bytes is over the limit of 10 bytes",
        {"Connection": "close"})


def test_a_stalled_body_is_408_naming_the_wait() -> None:
    sent, _, exc = run_gate(answering(), http_scope(), script(
        {"type": "http.request", "body": b"x", "more_body": True}, None), body_timeout=0.05)
    assert isinstance(exc, ApiError) and sent == []
    assert (exc.status_code, exc.code, exc.detail, exc.headers) == (
        408, "request_timeout", "no more of the request body came within 0.05 s", {"Connection": "close"})


def test_the_body_wait_is_30_s_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    real = asyncio.timeout

    def timeout(seconds: float) -> Any:
        waits.append(seconds)
        return real(0.01)

    monkeypatch.setattr(asyncio, "timeout", timeout)
    _, _, exc = run_gate(answering(), http_scope(), script(None))
    assert waits == [30.0] and isinstance(exc, ApiError) and exc.detail.endswith("within 30 s")


def disconnect_after_body(scope: Any, receive: Any, send: Any) -> Awaitable[None]:
    async def app() -> None:
        await read_all(receive)
        m = await receive()  # a route polling for a hang-up once it has the body
        assert m["type"] == "http.disconnect"

    return app()


@pytest.mark.parametrize("last", [{"type": "http.request", "body": b"abc"},
                                  {"type": "http.request", "body": b"abc", "more_body": False}])
def test_after_the_body_the_app_waits_for_a_hang_up_without_the_body_timeout(
    last: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="kiln.serve"):
        sent, metrics, exc = run_gate(disconnect_after_body, http_scope(headers=[(b"x-request-id", b"r9")]),
                                      script(dict(last), 0.2, {"type": "http.disconnect"}), body_timeout=0.05)
    assert exc is None and sent == []
    assert metrics.seen == [("", "unmatched", 499)]
    assert "request r9: the client disconnected before the answer" in caplog.messages


def test_a_hang_up_after_the_answer_started_is_not_499(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await read_all(receive)
        await send({"type": "http.response.start", "status": 202, "headers": []})
        assert (await receive())["type"] == "http.disconnect"
        await send({"type": "http.response.body", "body": b""})

    with caplog.at_level(logging.DEBUG, logger="kiln.serve"):
        _, metrics, exc = run_gate(app, http_scope(), script({"type": "http.request", "body": b"a"},
                                                             {"type": "http.disconnect"}))
    assert exc is None and metrics.seen == [("", "unmatched", 202)]
    assert not [m for m in caplog.messages if "disconnected" in m]


def test_client_disconnect_raised_by_the_app_is_499() -> None:
    from starlette.requests import ClientDisconnect

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ClientDisconnect()

    _, metrics, exc = run_gate(app, http_scope(), script())
    assert exc is None and metrics.seen == [("", "unmatched", 499)]


def test_an_app_failing_before_answering_is_recorded_as_500() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await read_all(receive)
        raise RuntimeError("boom")

    _, metrics, exc = run_gate(app, http_scope(), script({"type": "http.request", "body": b"a"}))
    assert isinstance(exc, RuntimeError) and metrics.seen == [("", "unmatched", 500)]


def test_fast_routes_are_served_by_their_handler() -> None:
    served: list[str] = []

    async def fast_app(scope: Any, receive: Any, send: Any) -> None:
        served.append("fast")
        await answering(203)(scope, receive, send)

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        served.append("app")
        await answering(200)(scope, receive, send)

    def pick(scope: Any) -> Any:
        return fast_app if scope["path"] == "/fast" else None

    _, metrics, _ = run_gate(slow_app, http_scope("/fast"), script({"type": "http.request"}), fast=pick)
    _, metrics2, _ = run_gate(slow_app, http_scope("/other"), script({"type": "http.request"}), fast=pick)
    assert served == ["fast", "app"] and metrics.seen[0][2] == 203 and metrics2.seen[0][2] == 200


def test_a_chunked_body_with_a_wrong_key_closes_the_connection() -> None:
    sent, _, _ = run_gate(answering(), http_scope(headers=[(b"transfer-encoding", b"chunked"),
                                                            (b"authorization", b"Bearer nope")]),
                          script({"type": "http.request", "body": b"a"}), api_key=KEY)
    assert sent[0]["status"] == 401 and (b"connection", b"close") in sent[0]["headers"]


def kserve_app() -> FastAPI:
    app = FastAPI()
    install(app)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request) -> dict[str, int]:
        return {"n": len(await request.body())}

    return app


def test_v2_paths_get_the_kserve_error_shape_from_the_gate() -> None:
    metrics = Recorder()
    app = kserve_app()
    app.add_middleware(RequestGate, limit=10, metrics=metrics, models={"digits"}, api_key=KEY)
    c = TestClient(app)
    resp = c.post("/v2/models/digits/infer", content=b"x")
    assert resp.status_code == 401 and resp.json() == {
        "error": "missing API key: send 'Authorization: Bearer <key>'"}
    resp = c.post("/v2/models/digits/infer", content=b"x" * 11, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 413 and resp.json() == {
        "error": "request body of 11 bytes is over the limit of 10 bytes"}


def test_latency_is_labelled_by_served_model_and_route_template() -> None:
    metrics = Timed()
    app = kserve_app()
    app.add_middleware(RequestGate, limit=10, metrics=metrics, models={"digits"})
    c = TestClient(app)
    assert c.post("/v1/models/digits/predict", content=b"abc").json() == {"n": 3}
    c.post("/v1/models/other/predict", content=b"abc")
    c.post("/nowhere", content=b"abc")
    assert metrics.seen == [
        ("digits", "/v1/models/{name}/predict", 200),
        ("", "/v1/models/{name}/predict", 200),
        ("", "unmatched", 404),
    ]
    assert all(0 <= s < 5 for s in metrics.seconds)
