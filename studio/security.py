"""The studio's gate, in front of every route: the Host a browser used (DNS rebinding), the token,
cross-site requests, and the body size.

- On a loopback bind, a request must name a loopback host (``localhost``, ``127.0.0.1``, ``[::1]``): a
  page on another site that rebinds its own name to 127.0.0.1 is refused.
- With a token, every ``/api`` call carries it: ``X-Kiln-Token`` (or ``Authorization: Bearer``); a GET may
  carry it as ``?token=`` (EventSource, image and download links cannot set headers).
- A state-changing call (any method but GET/HEAD/OPTIONS) needs the ``X-Kiln-Studio`` header, which a
  cross-site form cannot send and a cross-site script can only send after a CORS preflight the studio
  never approves, and, where the browser names an Origin, the studio's own.
- A body over ``max_upload_bytes`` is refused (413) by its Content-Length or as it streams in.
"""

from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.studio.config import StudioConfig, is_loopback

CSRF_HEADER = "x-kiln-studio"
TOKEN_HEADER = "x-kiln-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Gate:
    def __init__(self, app: ASGIApp, cfg: StudioConfig) -> None:
        self.app = app
        self.cfg = cfg

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            status, message = refusal
            await _error(send, status, message)
            return
        limit = self.cfg.max_upload_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _error(send, 413, f"request body over the studio's limit of {limit} bytes")
            return
        received = 0
        started = False
        refused = False

        async def counted_receive() -> Message:
            # Over the limit: answer 413 now and tell the app the client left (whatever it makes of the
            # missing body, its answer is dropped).
            nonlocal received, refused, started
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        started = True
                        await _error(send, 413, f"request body over the studio's limit of {limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted_receive, tracking_send)

    def refusal(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        hostname = urlsplit(f"//{host}").hostname or ""
        if is_loopback(self.cfg.host) and not is_loopback(hostname):
            return 403, (f"this studio listens on {self.cfg.host}; requests must name a loopback host, "
                         f"not {host!r}")
        path: str = scope["path"]
        method: str = scope["method"]
        if self.cfg.token and path.startswith("/api"):
            given = headers.get(TOKEN_HEADER) or _bearer(headers.get("authorization", ""))
            if not given and method == "GET":
                given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0]
            if not given or not secrets.compare_digest(given.encode(), self.cfg.token.encode()):
                return 401, "this studio needs its token (X-Kiln-Token header)"
        if method not in SAFE_METHODS:
            if CSRF_HEADER not in headers:
                return 403, (f"state-changing requests need the {CSRF_HEADER} header "
                             "(cross-site requests are refused)")
            origin = headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != host:
                return 403, f"cross-site request from {origin} refused"
        return None


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"),
                          (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
