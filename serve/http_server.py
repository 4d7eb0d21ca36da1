"""Uvicorn as ``kiln serve`` runs it: the connection limits from :class:`~kiln.serve.settings.Settings`
and a drain period after SIGTERM.

- Request head size (``max_header_bytes``): h11 enforces ``h11_max_incomplete_event_size`` itself;
  httptools (uvicorn's faster parser, used when installed) has no limit at all, so
  :class:`HeadLimitedHttpTools` counts the bytes of a head that has not ended yet and answers 431.
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


def _head_too_large(limit: int) -> bytes:
    body = json.dumps({"error": {"code": "header_too_large", "request_id": None,
                                 "message": f"request line and headers over the limit of {limit} bytes"}}).encode()
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


if HttpToolsProtocol is not None:

    class HeadLimitedHttpTools(HttpToolsProtocol):
        """uvicorn's httptools protocol, refusing a request head over ``h11_max_incomplete_event_size``
        bytes with 431 (the same setting h11 uses), before the parser has buffered more than that."""

        _in_head = True  # between one message's end and the next one's end of headers
        _head_bytes = 0

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                # Counted after parsing, so a chunk that finished the head (and began the body) is not.
                self._head_bytes += len(data)
                limit = self.config.h11_max_incomplete_event_size
                if limit is not None and self._head_bytes > limit:
                    log.debug("refused a request head of more than %d bytes", limit)
                    self.transport.write(_head_too_large(limit))
                    self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
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
