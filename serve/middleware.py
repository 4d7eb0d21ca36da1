"""The request gate every HTTP request passes before any route runs: a request id, the API key, the body
size limit and read timeout, client disconnects, and the latency metric.

A pure ASGI middleware rather than ``BaseHTTPMiddleware``: that one runs each request in an extra task
and buffers through a stream, a cost every request would pay.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Container

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.serve.auth import check_key, is_authorized, is_open
from kiln.serve.errors import ApiError, error_response
from kiln.serve.metrics import Metrics

log = logging.getLogger("kiln.serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Fresh ids: a random per-process prefix and a counter. uuid4 reads the OS's random source per request,
# which showed up as several percent of a busy server's time; ids only need to be unique, not secret.
_RID_PREFIX = os.urandom(6).hex() + "-"
_rid_counter = itertools.count(1)
# nginx's code for "the client closed the connection before the answer": recorded, never sent.
CLIENT_CLOSED = 499
# Answers sent before the body was read end the connection: otherwise the server would go on reading
# (and discarding) whatever body the client still sends.
_CLOSE = {"Connection": "close"}


class RequestGate:
    """Gives each request an id (the client's ``X-Request-ID`` when well-formed, else a fresh one) in
    ``scope["kiln.request_id"]`` and the response header; answers 401 without the API key on every path
    that is not :func:`~kiln.serve.auth.is_open`, before any body byte is read; answers 413 for a body over
    ``limit`` bytes, by Content-Length or as streamed, and 408 when the client sends no more of its body
    for ``body_timeout`` seconds; records a client that hung up mid-request as status 499 (logged at
    DEBUG: it is the client's doing); observes the latency by model, route and status.

    ``scope["kiln.authorized"]`` says whether the caller may see what only key holders see (always true
    without a key). ``models`` holds the served names: a path naming any other model is labelled ``""``,
    so arbitrary names cannot grow the metric's label set.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, models: Container[str], *,
                 api_key: str | None = None, body_timeout: float = 30.0, worker: str | None = None,
                 fast: Callable[[Scope], ASGIApp | None] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.models = models
        self.key = api_key.encode() if api_key else None
        self.body_timeout = body_timeout
        # Routes served directly, without the framework's per-request layers (kiln.serve.v1.FastPredict).
        self.fast = fast
        # Which process answered, when several share the port (kiln serve --workers N).
        self.extra_headers = [(b"x-kiln-worker", worker.encode())] if worker else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.match(rid):
            rid = f"{_RID_PREFIX}{next(_rid_counter):x}"
        scope["kiln.request_id"] = rid
        status = [0]  # 0: no answer started yet
        added = [(b"x-request-id", rid.encode()), *self.extra_headers]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        body_done, gone, seen = [False], [False], [0]

        async def guarded_receive() -> Message:
            if body_done[0]:  # from here on the app only polls for a disconnect, which may never come
                message = await receive()
            else:
                try:
                    async with asyncio.timeout(self.body_timeout):
                        message = await receive()
                except TimeoutError:
                    raise ApiError(408, "request_timeout", f"no more of the request body came within "
                                   f"{self.body_timeout:g} s", _CLOSE) from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise ApiError(413, "body_too_large", self._too_large(f"more than {self.limit}"), _CLOSE)
                body_done[0] = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not status[0]:
                gone[0] = True
            return message

        try:
            rejection = self._reject(scope, headers, rid)
            if rejection is not None:
                await rejection(scope, receive, send_with_id)
                return
            handler = self.fast(scope) if self.fast is not None else None
            await (handler or self.app)(scope, guarded_receive, send_with_id)
        except ClientDisconnect:
            gone[0] = True
        finally:
            if gone[0]:
                log.debug("request %s: the client disconnected before the answer", rid)
            code = CLIENT_CLOSED if gone[0] else status[0] or 500
            route = scope.get("route")
            name = scope.get("path_params", {}).get("name", "")
            self.metrics.observe_latency(name if name in self.models else "", getattr(route, "path", "unmatched"), code,
                                         time.perf_counter() - t0)

    def _reject(self, scope: Scope, headers: dict[bytes, bytes], rid: str) -> ASGIApp | None:
        """The answer for a request refused on its headers alone (no key, body too large), or None."""
        length = headers.get(b"content-length")
        has_body = (length is not None and length != b"0") or b"transfer-encoding" in headers
        if self.key is None:
            scope["kiln.authorized"] = True
        elif is_open(scope["path"]):
            scope["kiln.authorized"] = b"authorization" in headers and is_authorized(headers, self.key)
        else:
            denied = check_key(headers.get(b"authorization"), self.key)
            if denied is not None:
                extra = _CLOSE if has_body else {}
                return error_response(401, denied.code, str(denied.detail), rid, {**(denied.headers or {}), **extra},
                                      scope["path"])
            scope["kiln.authorized"] = True
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return error_response(413, "body_too_large", self._too_large(length.decode("latin-1")), rid, _CLOSE,
                                  scope["path"])
        return None

    def _too_large(self, size: str) -> str:
        return f"request body of {size} bytes is over the limit of {self.limit} bytes"


__all__ = ["CLIENT_CLOSED", "RequestGate"]
