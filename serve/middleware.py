"""The request gate every HTTP request passes: a request id, the body size limit, the latency metric.

A pure ASGI middleware rather than ``BaseHTTPMiddleware``: that one runs each request in an extra task
and buffers through a stream, a cost every request would pay.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Container

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.serve.errors import ApiError, error_response
from kiln.serve.metrics import Metrics

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestGate:
    """Gives each request an id (the client's ``X-Request-ID`` when well-formed, else a fresh one) in
    ``scope["kiln.request_id"]`` and the response header; answers 413 for a body over ``limit`` bytes,
    by Content-Length or as streamed; observes the latency by model, route and status.

    ``models`` holds the served names: a path naming any other model is labelled ``""``, so arbitrary
    names cannot grow the metric's label set.
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, models: Container[str]) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        scope["kiln.request_id"] = rid
        status = [500]
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                too_big = error_response(413, "body_too_large", self._too_large(length.decode("latin-1")), rid)
                await too_big(scope, receive, send_with_id)
                return
            seen = [0]

            async def limited_receive() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.limit:
                        raise ApiError(413, "body_too_large", self._too_large(f"more than {self.limit}"))
                return message

            await self.app(scope, limited_receive, send_with_id)
        finally:
            route = scope.get("route")
            name = scope.get("path_params", {}).get("name", "")
            self.metrics.latency.labels(
                name if name in self.models else "", getattr(route, "path", "unmatched"), str(status[0])
            ).observe(time.perf_counter() - t0)

    def _too_large(self, size: str) -> str:
        return f"request body of {size} bytes is over the limit of {self.limit} bytes"


__all__ = ["RequestGate"]
