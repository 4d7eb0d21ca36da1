"""The request gate every HTTP request passes before any route runs: a request id, the API key, exact
paths, the body size limit and read timeout, compressed bodies, client disconnects, and the latency metric.

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
import zlib
from collections.abc import Callable, Container
from functools import partial

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
# A path with a control character (``%0a`` decoded) is no route's: a ``$`` in a route pattern matches
# before a final newline, so such a path would reach the route it only resembles.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Request body encodings decoded here (tritonclient's request_compression_algorithm sends these).
ENCODINGS = ("gzip", "deflate")
# Decoded bytes handed to the app per receive(): a highly compressed body is inflated a piece at a time,
# with the event loop free between pieces.
_INFLATE_STEP = 1 << 20


class BodyDecoder:
    """Inflates a ``Content-Encoding: gzip`` or ``deflate`` request body a piece at a time, refusing it
    (413) as soon as the decoded bytes pass ``limit``: a small compressed body that inflates to gigabytes
    (a zip bomb) costs the server ``limit`` bytes of work, never more."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.encoding = encoding
        self.limit = limit
        # 32 + 15: the zlib or gzip header, detected; RFC 9110's "deflate" is the zlib format.
        self.inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
        self.pending = b""  # compressed bytes not inflated yet
        self.decoded = 0

    def feed(self, data: bytes) -> None:
        self.pending = self.pending + data if self.pending else data

    def step(self) -> bytes:
        """Up to :data:`_INFLATE_STEP` decoded bytes of what was fed (``b""`` once it is all inflated)."""
        if not self.pending:
            return b""
        try:
            out = self.inflater.decompress(self.pending, _INFLATE_STEP)
        except zlib.error as exc:
            raise ApiError(400, "invalid_request", f"the {self.encoding} request body is corrupt: {exc}",
                           _CLOSE) from None
        self.pending = self.inflater.unconsumed_tail
        if self.inflater.eof and (self.inflater.unused_data or self.pending):
            raise ApiError(400, "invalid_request",
                           f"data follows the end of the {self.encoding} request body", _CLOSE)
        self.decoded += len(out)
        if self.decoded > self.limit:
            raise ApiError(413, "body_too_large",
                           f"request body decoded from {self.encoding} is over the limit of "
                           f"{self.limit} bytes", _CLOSE)
        return out

    def finish(self) -> None:
        if not self.inflater.eof:
            raise ApiError(400, "invalid_request",
                           f"the {self.encoding} request body ends before its compressed data does", _CLOSE)


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
        decoder = self._decoder(scope, headers)

        async def network_receive() -> Message:
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

        async def decoding_receive(dec: BodyDecoder) -> Message:
            if dec.pending:  # the last network message is not all inflated yet
                await asyncio.sleep(0)
            else:
                message = await network_receive()
                if message["type"] != "http.request":
                    return message
                dec.feed(message.get("body", b""))
                if not dec.pending:
                    if not message.get("more_body", False):
                        dec.finish()
                    return message
            piece = dec.step()
            more = bool(dec.pending) or not body_done[0]
            if not more:
                dec.finish()
            return {"type": "http.request", "body": piece, "more_body": more}

        guarded_receive = network_receive if decoder is None else partial(decoding_receive, decoder)

        try:
            rejection = self._reject(scope, headers, rid) or self._refuse_encoding(scope, headers, rid)
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
            # the protocol answered for the app (a malformed body): what the client got
            code = scope.get("kiln.sent_status") or (CLIENT_CLOSED if gone[0] else status[0] or 500)
            route = scope.get("route")
            name = scope.get("path_params", {}).get("name", "")
            self.metrics.observe_latency(name if name in self.models else "",
                                         getattr(route, "path", "unmatched"), code, time.perf_counter() - t0)

    def _reject(self, scope: Scope, headers: dict[bytes, bytes], rid: str) -> ASGIApp | None:
        """The answer for a request refused on its head alone (a path with a control character, no key, a
        body too large), or None."""
        length = headers.get(b"content-length")
        has_body = (length is not None and length != b"0") or b"transfer-encoding" in headers
        if _CONTROL.search(scope["path"]):
            return error_response(404, "not_found", "Not Found", rid, None, scope["path"])
        if self.key is None:
            scope["kiln.authorized"] = True
        elif is_open(scope["path"]):
            scope["kiln.authorized"] = b"authorization" in headers and is_authorized(headers, self.key)
        else:
            denied = check_key(headers.get(b"authorization"), self.key)
            if denied is not None:
                extra = _CLOSE if has_body else {}
                return error_response(401, denied.code, str(denied.detail), rid,
                                      {**(denied.headers or {}), **extra}, scope["path"])
            scope["kiln.authorized"] = True
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return error_response(413, "body_too_large", self._too_large(length.decode("latin-1")), rid,
                                  _CLOSE, scope["path"])
        return None

    def _decoder(self, scope: Scope, headers: dict[bytes, bytes]) -> BodyDecoder | None:
        """A decoder for a gzip/deflate body; the app then sees the decoded body, without the
        Content-Encoding and (now wrong) Content-Length headers."""
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
        if encoding not in ENCODINGS:
            return None
        scope["headers"] = [
            (k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
        return BodyDecoder(encoding, self.limit)

    def _refuse_encoding(self, scope: Scope, headers: dict[bytes, bytes], rid: str) -> ASGIApp | None:
        """415 for a request body in an encoding this server does not decode."""
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
        length = headers.get(b"content-length")
        has_body = (length is not None and length != b"0") or b"transfer-encoding" in headers
        if encoding in ("", "identity", *ENCODINGS) or not has_body:
            return None
        message = (f"Content-Encoding '{encoding[:40]}' is not supported for request bodies; "
                   f"send {', '.join(ENCODINGS)} or identity")
        return error_response(415, "unsupported_media_type", message, rid, _CLOSE, scope["path"])

    def _too_large(self, size: str) -> str:
        return f"request body of {size} bytes is over the limit of {self.limit} bytes"


__all__ = ["CLIENT_CLOSED", "ENCODINGS", "BodyDecoder", "RequestGate"]
