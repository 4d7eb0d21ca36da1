"""The API key on every route the app has: walking ``app.routes`` covers a route added later without a
change here. Only the probes, the page and the docs are open; everything else answers 401 to a
missing, wrong, prefix, suffix, extended or empty key and to another scheme."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Route

from kiln.serve.app import create_app
from kiln.serve.settings import Settings

from .conftest import FakeBackend

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
    refused = [f"{m} {d}" for m, d, c in _requests(client) if d in PUBLIC and _send(client, m, c, None).status_code == 401]
    assert not refused
    assert client.get("/healthz").status_code == 200


def test_401_says_how_to_authenticate(client: TestClient) -> None:
    resp = client.get("/v2/models/digits")
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert KEY not in resp.text

