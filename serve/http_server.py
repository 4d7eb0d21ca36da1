"""Uvicorn as ``kiln serve`` runs it: the connection limits from :class:`~kiln.serve.settings.Settings`
and a drain period after SIGTERM.

- Request head size (``max_header_bytes``): h11 enforces ``h11_max_incomplete_event_size`` itself;
  httptools (uvicorn's faster parser, used when installed) has no limit at all, so
  :class:`HeadLimitedHttpTools` counts the bytes of each request head (request line and headers, never
  body bytes, however the client's writes were cut into TCP reads) and answers 431.
- Head deadline (``header_timeout_s``): uvicorn times out idle keep-alive connections but never a request
  head that trickles in, nor a connection that never sends a byte. :class:`KilnHttpTools` closes such a
  connection: 408 when part of a head came, silently when nothing did.
- Open connections (``max_connections``): uvicorn's ``limit_concurrency`` answers only once a head is
  complete, in plain text, with a warning per request, and refuses health probes too. Above the cap,
  :class:`KilnHttpTools` answers 503 (``Connection: close``, the protocol's error shape) as soon as the
  head is in, except to ``/healthz`` and ``/readyz``, which keep answering on a few connections of
  headroom; past that headroom a connection is closed at once. The cap's default comes from the
  open-file limit, whose soft value :func:`raise_open_file_limit` lifts to the hard one at start.
- Keep-alive (``keep_alive_s``): uvicorn's ``timeout_keep_alive``. The body read timeout lives in
  :class:`~kiln.serve.middleware.RequestGate`, which sees every ``receive()``.
- Drain (``drain_s``): Kubernetes sends SIGTERM and keeps routing to the pod until its endpoints are
  updated. :class:`DrainingServer` turns ``/readyz`` to 503 at once and keeps the listener open for the
  drain period, then shuts down as uvicorn does (finish in-flight requests, then the lifespan). From the
  drain's start every response says ``Connection: close`` and idle keep-alive connections are closed
  after at most :data:`DRAIN_IDLE_S`, while the listener still accepts: a client reconnects instead of
  finding its kept-alive connection reset when the listener closes. At the drain's end the listener
  refuses new connections first and accepts those already queued for :data:`ACCEPT_GRACE_S`
  (:func:`refuse_new_connections`): closing it would reset them.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import resource
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from kiln.serve.heap import return_large_buffers
from kiln.serve.registry import Registry
from kiln.serve.settings import Settings

log = logging.getLogger("kiln.serve")

try:
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: uvicorn uses h11, which enforces the limit itself
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def _error(status: bytes, code: str, message: str, url: bytes, extra: bytes = b"") -> bytes:
    """A whole ``Connection: close`` error response written by the protocol itself (the app never saw the
    request), in each protocol's own error shape: KServe v2 clients (tritonclient) read
    ``{"error": "<string>"}``."""
    error: object = message if url.startswith(b"/v2") else {"code": code, "request_id": None,
                                                            "message": message}
    body = json.dumps({"error": error}).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n" + extra
            + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def _head_too_large(limit: int, url: bytes) -> bytes:
    return _error(b"431 Request Header Fields Too Large", "header_too_large",
                  f"request line and headers over the limit of {limit} bytes", url)


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

        def send_400_response(self, msg: str) -> None:
            # A malformed body (a bad chunk) ends the request from under the app, which sees only a
            # disconnect: the gate records the status the client was sent instead of 499.
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.scope["kiln.sent_status"] = 400  # type: ignore[typeddict-unknown-key]
            super().send_400_response(msg)

        def on_message_complete(self) -> None:
            self._in_head = True
            self._reported = self._pending = 0
            if not self._refused:
                super().on_message_complete()


# File descriptors kept for everything but HTTP connections (models, logs, gRPC, the event loop).
FD_RESERVE = 128
# Connections above the cap that may still bring a health probe; past them a connection is closed at once.
PROBE_HEADROOM = 64
# The default cap's ceiling: memory (a few KB per connection) rather than file descriptors bounds it.
MAX_DEFAULT_CONNECTIONS = 8192
# Paths answered above the connection cap: a liveness probe failing under a flood of slow clients would
# get the process restarted, dropping every connection instead of the slow ones.
PROBES = frozenset({b"/healthz", b"/readyz"})
# How long a connection above the cap may take to send its head.
OVER_CAP_HEADER_TIMEOUT_S = 1.0
# During the drain, the longest an idle keep-alive connection stays open.
DRAIN_IDLE_S = 1.0
# At the drain's end: how long connections already queued on the listener are still accepted (and
# answered) after new ones are refused, before the listener closes.
ACCEPT_GRACE_S = 0.5
# A classic BPF program of one instruction, "ret #0": every packet to the socket is dropped.
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)
_SO_ATTACH_FILTER = 26  # Linux


def refuse_new_connections(sock: socket.socket | Any) -> bool:
    """Make a listening socket drop new connection attempts (SYNs) while connections already in its
    accept queue can still be accepted; returns whether it could (Linux only).

    Closing a listener resets every connection in its accept queue: clients that connected a moment
    before see ECONNRESET on a request they already sent. Refusing new ones first, then accepting the
    queue for :data:`ACCEPT_GRACE_S`, leaves a client at most a refused (retried) connection attempt."""
    if sys.platform != "linux":
        return False
    program = ctypes.create_string_buffer(_DROP_ALL)
    fprog = struct.pack("HxxxxxxQ", 1, ctypes.addressof(program))  # struct sock_fprog {len; *filter}
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.debug("could not stop new connections on the listener before closing it: %s", exc)
        return False
    return True


def raise_open_file_limit() -> int:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit where allowed (a shell's default soft limit,
    often 1024, is what a flood of slow clients exhausts first); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still stops at the kernel's nr_open (1048576 by default).
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def default_max_connections(open_files: int) -> int:
    """The connection cap for a process allowed ``open_files`` descriptors: what is left after the
    reserve and the probes' headroom, at most :data:`MAX_DEFAULT_CONNECTIONS`."""
    return max(16, min(MAX_DEFAULT_CONNECTIONS, open_files - FD_RESERVE - PROBE_HEADROOM))


@dataclass
class ConnectionLimits:
    """What every connection of one server shares: its limits and whether the server is draining."""

    header_timeout_s: float
    max_connections: int
    keep_alive_s: float
    draining: bool = False
    refused: int = 0  # connections refused over the cap since the last warning
    warned_at: float = float("-inf")

    def refusing(self, open_connections: int) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.warned_at >= 10:  # one line per 10 s of a flood, not one per connection
            log.warning("%d open connections, over the limit of %d (--max-connections): refused %d since "
                        "the last warning with 503", open_connections, self.max_connections, self.refused)
            self.warned_at, self.refused = now, 0


if HttpToolsProtocol is not None:

    class KilnHttpTools(HeadLimitedHttpTools):
        """The head limit, plus a deadline for each request head, the connection cap, and the drain
        (``Connection: close`` on every response, idle connections closed). ``limits`` is the server's
        :class:`ConnectionLimits` (bound with :func:`functools.partial` in :func:`build_server`)."""

        _head_timer: asyncio.TimerHandle | None = None
        _over_cap = False

        def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.limits = limits

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            open_connections = len(self.connections)  # this one included
            cap = self.limits.max_connections
            timeout = self.limits.header_timeout_s
            if open_connections > cap:
                self.limits.refusing(open_connections)
                if open_connections > cap + PROBE_HEADROOM:
                    transport.close()
                    return
                self._over_cap = True
                timeout = min(timeout, OVER_CAP_HEADER_TIMEOUT_S)
            self._head_timer = self.loop.call_later(timeout, self._head_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # The first bytes of a head on a kept-alive connection (or after a pipelined request) start its
            # deadline; uvicorn's keep-alive timer stopped at the first byte.
            if (self._head_timer is None and self._in_head and (self._reported or self._pending)
                    and not self._refused and not self.transport.is_closing()):
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                # A response is still being written: no 408 in the middle of it; close once it is sent.
                self.cycle.keep_alive = False
                self.flow.pause_reading()
                return
            self._refused = True
            if self._reported or self._pending:
                log.debug("request head not complete after its deadline: 408")
                self.transport.write(_error(
                    b"408 Request Timeout", "header_timeout",
                    f"request line and headers not complete within {self.limits.header_timeout_s:g} s",
                    getattr(self, "url", b"") or b""))
            self.transport.close()

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            if self._refused:
                return
            if self._over_cap and self._path() not in PROBES:
                self._refused = True
                self.transport.write(_error(
                    b"503 Service Unavailable", "too_many_connections",
                    f"the server has {self.limits.max_connections} connections open, its limit; retry later",
                    self.url, b"retry-after: 1\r\n"))
                self.transport.close()
                return
            super().on_headers_complete()
            if (self.limits.draining or self._over_cap) and self.cycle is not None and not self._refused:
                self.cycle.keep_alive = False  # the response says "Connection: close"

        def _path(self) -> bytes:
            try:
                return httptools.parse_url(self.url).path or b""
            except httptools.HttpParserInvalidURLError:
                return b""

        def drain(self) -> None:
            """The drain started: the response in flight (the last pipelined one) closes the connection;
            an idle kept-alive connection closes within :data:`DRAIN_IDLE_S`."""
            if self.cycle is not None and not self.cycle.response_complete:
                (self.pipeline[0][0] if self.pipeline else self.cycle).keep_alive = False
            elif self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = self.loop.call_later(
                    min(self.limits.keep_alive_s, DRAIN_IDLE_S), self.timeout_keep_alive_handler)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.limits.draining and self.timeout_keep_alive_task is not None:
                self.drain()

        def shutdown(self) -> None:
            """The listener closed. uvicorn closes a connection without a request at once, resetting one
            accepted a moment ago whose request is on its way; here such a connection (and one whose head
            is arriving) gets until its head deadline, at most :data:`DRAIN_IDLE_S` for one that sent
            nothing, and its request is answered with ``Connection: close``."""
            self.limits.draining = True
            if self.cycle is None and not self._refused and not self.transport.is_closing():
                if not (self._reported or self._pending) and self._head_timer is not None:
                    self._head_timer.cancel()
                    self._head_timer = self.loop.call_later(DRAIN_IDLE_S, self._head_timeout)
                if self._head_timer is not None:
                    return
            super().shutdown()


def http_protocol(limits: ConnectionLimits | None = None) -> Any:
    """The protocol class (or uvicorn's name for one) that enforces the connection limits."""
    if HttpToolsProtocol is None:
        return "h11"
    if limits is None:
        return HeadLimitedHttpTools
    return functools.partial(KilnHttpTools, limits=limits)


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM: ``registry.stopping`` (``/readyz`` answers 503 "shutting down") while the
    listener stays open for ``drain_s`` seconds, then uvicorn's shutdown. SIGINT (Ctrl-C) or a second
    SIGTERM shuts down at once."""

    def __init__(self, config: uvicorn.Config, registry: Registry, drain_s: float,
                 limits: ConnectionLimits | None = None, own_listener: bool = True) -> None:
        super().__init__(config)
        self.registry = registry
        self.drain_s = drain_s
        self.limits = limits
        # A listener shared with other workers is theirs too: the parent refuses new connections on it.
        self.own_listener = own_listener
        self.close_at: float | None = None
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
                log.info("SIGTERM: not ready; still serving for %g s before closing the listener",
                         self.drain_s)
                if self.limits is not None:
                    self.limits.draining = True
                for connection in list(self.server_state.connections):
                    drain = getattr(connection, "drain", None)
                    if drain is not None:
                        drain()
            now = time.monotonic()
            if now >= self.drain_until and self.close_at is None:
                refused = self.own_listener and all(
                    [refuse_new_connections(sock) for server in self.servers for sock in server.sockets])
                # A shared listener: the parent refuses new connections on it at the same moment.
                self.close_at = now + (ACCEPT_GRACE_S if refused or not self.own_listener else 0)
            if self.close_at is not None and now >= self.close_at:
                super().handle_exit(signal.SIGTERM, None)  # recorded, so uvicorn re-raises it after shutdown
        return await super().on_tick(counter)


def build_server(app: Any, registry: Registry, settings: Settings, *, access_log: bool = False,
                 own_listener: bool = True) -> DrainingServer:
    """The uvicorn server for ``app`` with every connection limit from ``settings``. Lifts the soft
    open-file limit to the hard one (:func:`raise_open_file_limit`); the connection cap defaults to a
    size derived from it. ``own_listener=False``: the listening socket is shared with other workers, so
    the drain's end leaves refusing new connections on it to the parent. Large request buffers are
    returned to the system when freed (:func:`kiln.serve.heap.return_large_buffers`)."""
    return_large_buffers()
    open_files = raise_open_file_limit()
    max_connections = settings.max_connections or default_max_connections(open_files)
    limits = ConnectionLimits(settings.header_timeout_s, max_connections, settings.keep_alive_s)
    if HttpToolsProtocol is None:
        log.warning("httptools is not installed: no request head deadline and no connection cap "
                    "(pip install 'uvicorn[standard]')")
    else:
        log.debug("at most %d HTTP connections; request heads within %g s", max_connections,
                  settings.header_timeout_s)
    config = uvicorn.Config(
        app,
        http=http_protocol(limits),
        log_config=None,  # keep kiln's logging setup
        access_log=access_log,
        lifespan="on",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_s,
        # In-flight requests finish within their own deadline; don't wait for stragglers beyond it.
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
    )
    return DrainingServer(config, registry, settings.drain_s, limits, own_listener)


__all__ = ["ConnectionLimits", "DrainingServer", "build_server", "default_max_connections", "http_protocol",
           "raise_open_file_limit", "refuse_new_connections"]
