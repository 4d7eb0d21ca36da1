"""The API key check shared by every protocol's guarded routes (health probes stay open)."""

from __future__ import annotations

import secrets

from fastapi import Depends, Request

from kiln.serve.errors import ApiError


async def require_key(request: Request) -> None:
    """Accept ``Authorization: Bearer <key>`` when the app has an API key (``app.state.api_key``)."""
    api_key: str | None = request.app.state.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                       {"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "unauthorized", "wrong API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})


AUTH = [Depends(require_key)]

__all__ = ["AUTH", "require_key"]
