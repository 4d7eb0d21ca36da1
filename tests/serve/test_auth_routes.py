"""The API key on every route the app has: walking ``app.routes`` covers a route added later without a
change here. Only the probes, the page and the docs are open; everything else answers 401 to a
missing, wrong, prefix, suffix, extended or empty key and to another scheme. The key as a client meets
it: the exact 401 (status, code, message, the ``WWW-Authenticate`` challenge RFC 6750 asks for), which
models an unknown-model answer names depending on the key, and the ``require_key`` dependency for routes
mounted outside the request gate."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Route

from kiln.serve import errors
from kiln.serve.app import create_app
from kiln.serve.auth import AUTH, check_key, is_authorized
from kiln.serve.settings import Settings

from .conftest import FakeBackend, make_bundle

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

KEY = "s3cret-key-0123"

# Route paths (as declared) that need no key: liveness and readiness probes, the page, the API docs.
PUBLIC = {
    "/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
    "/v2/health/live", "/v2/health/ready",
}

BAD_AUTHORIZATION = {
    "none": None,
    "wrong": f"Bearer {'x' * len(KEY)}",
    "prefix": f"Bearer {KEY[:-1]}",
    "short prefix": f"Bearer {KEY[:1]}",
    "suffix": f"Bearer {KEY[1:]}",
    "key plus more": f"Bearer {KEY}0",
    "empty": "Bearer ",
    "blank": "Bearer    ",
    "no scheme": KEY,
    "other scheme": f"Basic {KEY}",
    "other case": f"Bearer {KEY.upper()}",
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from .conftest import make_bundle

    root = tmp_path_factory.mktemp("auth")
    models: list[tuple[str, Any]] = [("digits", make_bundle(root / "digits")),
                                     ("shapes", make_bundle(root / "shapes", task="detect"))]
    app = create_app(models, Settings(api_key=KEY, max_delay_ms=1.0),
                     loader=lambda bundle, _s: FakeBackend(bundle))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _requests(client: TestClient) -> list[tuple[str, str, str]]:
    """(method, declared path, concrete path) for every HTTP route of the app."""
    out = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if not isinstance(route, Route):
            continue
        concrete = route.path.replace("{name}", "digits").replace("{version}", "1")
        concrete = re.sub(r"\{[^}]+\}", "x", concrete)
        for method in sorted(route.methods or {"GET"}):
            if method not in ("HEAD", "OPTIONS"):
                out.append((method, route.path, concrete))
    return out


def _send(client: TestClient, method: str, path: str, authorization: str | None) -> Any:
    headers = {} if authorization is None else {"Authorization": authorization}
    body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return client.request(method, path, headers=headers, **body)


def test_the_walk_sees_the_guarded_routes(client: TestClient) -> None:
    declared = {path for _, path, _ in _requests(client)}
    for path in ("/v1/models", "/v1/models/{name}", "/v1/models/{name}/predict", "/metrics",
                 "/v2", "/v2/models/{name}", "/v2/models/{name}/infer"):
        assert path in declared, path
    assert declared - PUBLIC, "no guarded route found"


@pytest.mark.parametrize("bad", list(BAD_AUTHORIZATION))
def test_every_guarded_route_refuses_a_bad_key(client: TestClient, bad: str) -> None:
    let_through = []
    for method, declared, concrete in _requests(client):
        if declared in PUBLIC:
            continue
        resp = _send(client, method, concrete, BAD_AUTHORIZATION[bad])
        if resp.status_code != 401:
            let_through.append(f"{method} {declared} -> {resp.status_code}")
    assert not let_through, f"{bad} key accepted by: {let_through}"


def test_every_guarded_route_accepts_the_key(client: TestClient) -> None:
    refused = [f"{m} {d}" for m, d, c in _requests(client)
               if d not in PUBLIC and _send(client, m, c, f"Bearer {KEY}").status_code == 401]
    assert not refused
    assert client.get("/v2/models/digits", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_public_routes_need_no_key(client: TestClient) -> None:
    refused = [f"{m} {d}" for m, d, c in _requests(client) if d in PUBLIC
               and _send(client, m, c, None).status_code == 401]
    assert not refused
    assert client.get("/healthz").status_code == 200


def test_401_says_how_to_authenticate(client: TestClient) -> None:
    resp = client.get("/v2/models/digits")
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert KEY not in resp.text


MISSING = "missing API key: send 'Authorization: Bearer <key>'"


def _client(tmp_path_factory: pytest.TempPathFactory, api_key: str | None) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("auth")
    app = create_app([("digits", make_bundle(root / "digits"))], Settings(api_key=api_key, max_delay_ms=1.0),
                     loader=lambda bundle, _s: FakeBackend(bundle))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from _client(tmp_path_factory, KEY)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    yield from _client(tmp_path_factory, None)


def test_missing_key_is_a_401_with_the_bearer_challenge(keyed: TestClient) -> None:
    resp = keyed.get("/v1/models")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized"
    assert resp.json()["error"]["message"] == MISSING
    assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_wrong_key_is_a_401_with_the_invalid_token_challenge(keyed: TestClient) -> None:
    resp = keyed.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401
    assert resp.json()["error"] == {
        **resp.json()["error"],
        "code": "unauthorized",
        "message": "wrong API key",
    }
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


def test_check_key_answers() -> None:
    missing = check_key(None, KEY.encode())
    assert missing is not None
    assert (missing.status_code, missing.code, missing.detail, missing.headers) == (
        401, "unauthorized", MISSING, {"WWW-Authenticate": "Bearer"})
    wrong = check_key(b"Bearer nope", KEY.encode())
    assert wrong is not None
    assert (wrong.status_code, wrong.code, wrong.detail, wrong.headers) == (
        401, "unauthorized", "wrong API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    assert check_key(f"Bearer {KEY}".encode(), KEY.encode()) is None


def test_spaces_between_the_scheme_and_the_key_are_allowed(keyed: TestClient) -> None:
    assert check_key(f"Bearer   {KEY}".encode(), KEY.encode()) is None
    assert keyed.get("/v1/models", headers={"Authorization": f"bearer  {KEY}"}).status_code == 200


def test_is_authorized() -> None:
    assert is_authorized({}, None)
    assert is_authorized({b"authorization": b"Bearer x"}, None)
    assert is_authorized({b"authorization": f"Bearer {KEY}".encode()}, KEY.encode())
    assert not is_authorized({b"authorization": b"Bearer x"}, KEY.encode())
    assert not is_authorized({}, KEY.encode())


def test_unknown_model_names_the_served_models_to_key_holders_only(keyed: TestClient) -> None:
    # per-model readiness needs the key: without it, nothing tells a served name from an unknown one
    with_key = keyed.get("/v2/models/nope/ready", headers={"Authorization": f"Bearer {KEY}"})
    assert with_key.status_code == 404 and "digits" in with_key.json()["error"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for name in ("nope", "digits"):
            resp = keyed.get(f"/v2/models/{name}/ready", headers=headers)
            assert resp.status_code == 401 and "digits" not in resp.json()["error"], headers


def test_unknown_model_names_the_served_models_on_an_open_server(open_server: TestClient) -> None:
    resp = open_server.get("/v2/models/nope/ready")
    assert resp.status_code == 404 and "digits" in resp.json()["error"]


def _outside_the_gate(api_key: str | None) -> TestClient:
    app = FastAPI()
    errors.install(app)
    app.state.api_key = api_key

    @app.get("/extra", dependencies=AUTH)
    def extra() -> dict[str, Any]:
        return {"ok": True}

    return TestClient(app, raise_server_exceptions=False)


def test_require_key_guards_a_route_mounted_outside_the_gate() -> None:
    client = _outside_the_gate(KEY)
    missing = client.get("/extra")
    assert missing.status_code == 401 and missing.json()["error"]["message"] == MISSING
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = client.get("/extra", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "wrong API key"
    assert client.get("/extra", headers={"Authorization": f"Bearer {KEY}"}).json() == {"ok": True}


def test_require_key_lets_everyone_through_without_a_key() -> None:
    assert _outside_the_gate(None).get("/extra").json() == {"ok": True}
