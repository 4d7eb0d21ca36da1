"""The API key: which paths need it, and the check itself.

:class:`~kiln.serve.middleware.RequestGate` runs the check before any route is matched or any body byte
is read, so a caller without the key costs the server one header lookup whatever it sends. Every path
needs the key except the probes, the page and the OpenAPI docs (:func:`is_open`): a route added later is
guarded unless it is named here. Per-model readiness (``/v2/models/{name}/ready``) needs the key: its
answer would tell a stranger which model names are served; the server-wide probes name no model.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from fastapi import Depends, Request

from kiln.serve.errors import ApiError

_OPEN_PATHS = frozenset({
    "/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
    "/v2/health/live", "/v2/health/ready", "/static/testpanel.js", "/static/testpanel.css",
})
# Swagger UI's and ReDoc's scripts and styles, served from the package (kiln.serve.app).
DOCS_ASSETS = "/docs-assets"


def is_open(path: str) -> bool:
    """Whether ``path`` is served without the API key (health probes, the page, the docs and their assets)."""
    return path in _OPEN_PATHS or path.startswith(DOCS_ASSETS + "/")


def check_key(authorization: bytes | None, key: bytes) -> ApiError | None:
    """None when ``authorization`` (the raw header value) is ``Bearer <key>``, else the 401 to answer.

    The whole token is compared in constant time, so the answer's timing says nothing about the key.
    """
    scheme, _, token = (authorization or b"").partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                        {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token, key):
        return ApiError(401, "unauthorized", "wrong API key",
                        {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return None


def is_authorized(headers: Mapping[bytes, bytes], key: bytes | None) -> bool:
    """Whether a request with these (lower-cased) headers may see what only key holders see."""
    return key is None or check_key(headers.get(b"authorization"), key) is None


async def require_key(request: Request) -> None:
    """A route dependency doing the gate's check again; the gate already guards every path that is not
    :func:`is_open`, so no kiln route uses it. Kept for routes mounted outside the gate."""
    api_key: str | None = request.app.state.api_key
    if api_key is None:
        return
    error = check_key(request.headers.get("authorization", "").encode("latin-1"), api_key.encode())
    if error is not None:
        raise error


AUTH = [Depends(require_key)]

__all__ = ["AUTH", "check_key", "is_authorized", "is_open", "require_key"]
