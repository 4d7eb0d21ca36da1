"""Uvicorn as ``kiln serve`` runs it: the connection limits from :class:`~kiln.serve.settings.Settings`
and a drain period after SIGTERM.

- Request head size (``max_header_bytes``): h11 enforces ``h11_max_incomplete_event_size`` itself;
  httptools (uvicorn's faster parser, used when installed) has no limit at all, so
  :class:`HeadLimitedHttpTools` counts the bytes of each request head (request line and headers, never
  body bytes, however the client's writes were cut into TCP reads) and answers 431.
- Keep-alive (``keep_alive_s``): uvicorn's ``timeout_keep_alive``. The body read timeout lives in
  :class:`~kiln.serve.middleware.RequestGate`, which sees every ``receive()``.
- Drain (``drain_s``): Kubernetes sends SIGTERM and keeps routing to the pod until its endpoints are
  updated. :class:`DrainingServer` turns ``/readyz`` to 503 at once and keeps the listener open for the
  drain period, then shuts down as uvicorn does (finish in-flight requests, then the lifespan).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from types import FrameType
from typing import Any

import uvicorn

from kiln.serve.registry import Registry
from kiln.serve.settings import Settings

log = logging.getLogger("kiln.serve")

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: uvicorn uses h11, which enforces the limit itself
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def _head_too_large(limit: int, url: bytes) -> bytes:
    message = f"request line and headers over the limit of {limit} bytes"
    # Each protocol's own error shape: KServe v2 clients (tritonclient) read {"error": "<string>"}.
    error: object = message if url.startswith(b"/v2") else {
        "code": "header_too_large", "request_id": None, "message": message}
    body = json.dumps({"error": error}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


# Bytes of a head that the parser callbacks do not report: "GET", " ", " HTTP/1.1\r\n" and the final CRLF.
_LINE_OVERHEAD = 16
# Bytes a header line has beyond its name and value: ": " and CRLF.
_HEADER_OVERHEAD = 4


if HttpToolsProtocol is not None:

    class HeadLimitedHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol, refusing a request head over ``h11_max_incomplete_event_size``
        bytes (the setting h11 uses) with 431, before the app sees the request.

        Only head bytes count, whatever the segmentation of the stream: a TCP read may hold the end of
        one request's body, a whole pipelined request and the start of the next head. The parser
        callbacks report the head piece by piece (``on_url`` fragments, each completed header); what they
        have not reported yet (a header still arriving, which httptools buffers internally) is bounded
        by the read's bytes that were neither body nor an already reported piece.
        """

        _reported = 0  # bytes of the open head reported by callbacks (request line, completed headers)
        _pending = 0  # bytes of the open head not reported yet (a bound)
        _in_head = True  # between one message's end and the next one's end of headers
        _read_body = 0  # body bytes of the current read
        _read_reported = 0  # bytes reported by callbacks during the current read
        _refused = False

        def data_received(self, data: bytes) -> None:
            self._read_body = self._read_reported = 0
            super().data_received(data)
            if not self._in_head or self._refused or self.transport.is_closing():
                return
            unexplained = len(data) - self._read_body - self._read_reported
            if self._read_reported:  # the open head's reported pieces end inside this read
                self._pending = max(0, unexplained)
            else:  # nothing reported: every non-body byte of this read belongs to the open head
                self._pending += max(0, len(data) - self._read_body)
            self._check(self._reported + self._pending)

        def _check(self, head_bytes: int) -> bool:
            limit = self.config.h11_max_incomplete_event_size
            if limit is None or head_bytes <= limit:
                return True
            log.debug("refused a request head of more than %d bytes", limit)
            self._refused = True
            self.transport.write(_head_too_large(limit, getattr(self, "url", b"") or b""))
            self.transport.close()
            return False

        def _report(self, n: int) -> None:
            self._reported += n
            self._read_reported += n

        # Once refused, the parser may still report the rest of the read: nothing more reaches uvicorn.
        def on_message_begin(self) -> None:
            if self._refused:
                return
            self._in_head = True
            self._reported = _LINE_OVERHEAD
            self._pending = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._report(len(url))
            if not self._refused:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._report(len(name) + len(value) + _HEADER_OVERHEAD)
            if not self._refused:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._refused or not self._check(self._reported):
                return  # the app never sees a request whose head was over the limit
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            self._read_body += len(body)
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._in_head = True
            self._reported = self._pending = 0
            if not self._refused:
                super().on_message_complete()


def http_protocol() -> Any:
    """The protocol class (or uvicorn's name for one) that enforces the head size limit."""
    return HeadLimitedHttpTools if HttpToolsProtocol is not None else "h11"


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM: ``registry.stopping`` (``/readyz`` answers 503 "shutting down") while the
    listener stays open for ``drain_s`` seconds, then uvicorn's shutdown. SIGINT (Ctrl-C) or a second
    SIGTERM shuts down at once."""

    def __init__(self, config: uvicorn.Config, registry: Registry, drain_s: float) -> None:
        super().__init__(config)
        self.registry = registry
        self.drain_s = drain_s
        self.drain_until: float | None = None
        self.drain_announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_s > 0 and self.drain_until is None and not self.should_exit:
            # A signal handler: only set flags here; on_tick (on the event loop) does the rest.
            self.drain_until = time.monotonic() + self.drain_s
            self.registry.stopping = True
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and not self.should_exit:
            if not self.drain_announced:
                self.drain_announced = True
                log.info("SIGTERM: not ready; still serving for %g s before closing the listener", self.drain_s)
            if time.monotonic() >= self.drain_until:
                super().handle_exit(signal.SIGTERM, None)  # recorded, so uvicorn re-raises it after shutdown
        return await super().on_tick(counter)


def build_server(app: Any, registry: Registry, settings: Settings, *, access_log: bool = False) -> DrainingServer:
    """The uvicorn server for ``app`` with every connection limit from ``settings``."""
    config = uvicorn.Config(
        app,
        http=http_protocol(),
        log_config=None,  # keep kiln's logging setup
        access_log=access_log,
        lifespan="on",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_s,
        # In-flight requests finish within their own deadline; don't wait for stragglers beyond it.
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
    )
    return DrainingServer(config, registry, settings.drain_s)


__all__ = ["DrainingServer", "build_server", "http_protocol"]
