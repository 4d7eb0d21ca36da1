"""The API key as a client meets it: the exact 401 (status, code, message, the ``WWW-Authenticate``
challenge RFC 6750 asks for), which models an unknown-model answer names depending on the key, and the
``require_key`` dependency for routes mounted outside the request gate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kiln.serve import errors
from kiln.serve.app import create_app
from kiln.serve.auth import AUTH, check_key, is_authorized
from kiln.serve.settings import Settings

from .conftest import FakeBackend, make_bundle

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

KEY = "s3cret-key-0123"
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
    assert resp.json()["error"] == {**resp.json()["error"], "code": "unauthorized", "message": "wrong API key"}
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
