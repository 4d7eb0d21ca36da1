"""A lean HTTP/1.1 client for load generation: keep-alive connections on asyncio streams.

A general client (connection pool, header objects, response objects, URL handling per request) costs
more CPU per request than a small model server spends answering it, so the client would be what a
benchmark measures. This one sends pre-encoded request bytes and reads just enough of each answer to
know where it ends: the status line, ``Content-Length``, ``Transfer-Encoding: chunked`` and
``Connection: close``. Bodies are read and dropped.

Control-plane reads (model metadata, ``/metrics``) are rare and want the body, so they go through the
standard library's ``http.client`` instead (:func:`http_get`).
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# A response head larger than this is not a server under test answering normally.
MAX_HEAD = 64 * 1024
NO_BODY_STATUSES = frozenset({204, 304})


class ProtocolError(Exception):
    """The answer is not HTTP/1.x as this client reads it."""


class StaleConnection(Exception):
    """A reused keep-alive connection was closed by the server before any byte of the answer came."""


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: host, port, TLS, and the ``Host`` header value."""

    host: str
    port: int
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """``http://HOST[:PORT]`` or ``https://...``; raises ValueError for anything else."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected http://HOST[:PORT] or https://HOST[:PORT], got '{url}'")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def encode_request(method: str, path: str, endpoint: Endpoint, headers: Mapping[str, str],
                   body: bytes) -> bytes:
    """The bytes of one HTTP/1.1 request, keep-alive (the default of HTTP/1.1)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {endpoint.authority}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """(status, content length or None, chunked, keep-alive) of a response head ending in CRLF CRLF."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise ProtocolError(f"bad status code in {lines[0][:80]!r}") from None
    keep_alive = parts[0] != b"HTTP/1.0"  # 1.0 closes unless it says keep-alive
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise ProtocolError(f"bad Content-Length {value.strip()[:40]!r}") from None
        elif name == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
    return status, length, chunked, keep_alive


async def _read_chunked(reader: asyncio.StreamReader) -> int:
    size_total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
        if size == 0:
            break
        await reader.readexactly(size + 2)  # the chunk and its CRLF
        size_total += size
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, up to the empty line
        pass
    return size_total


class Connection:
    """One keep-alive connection; one request at a time. ``usable`` turns False once it must not be reused."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.requests = 0
        self.closed = False

    @classmethod
    async def open(cls, endpoint: Endpoint, ssl_context: ssl.SSLContext | None = None) -> Connection:
        reader, writer = await asyncio.open_connection(
            endpoint.host, endpoint.port, ssl=ssl_context if endpoint.tls else None, limit=MAX_HEAD)
        return cls(reader, writer)

    @property
    def usable(self) -> bool:
        return not self.closed and not self.reader.at_eof()

    async def exchange(self, payload: bytes) -> tuple[int, int]:
        """Send ``payload`` (a whole request), read the answer: (status, body bytes read)."""
        reused = self.requests > 0
        self.requests += 1
        self.writer.write(payload)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if reused and not exc.partial:
                raise StaleConnection from None
            raise
        except ConnectionResetError:
            if reused:
                raise StaleConnection from None
            raise
        except asyncio.LimitOverrunError:
            raise ProtocolError(f"response head over {MAX_HEAD} bytes") from None
        status, length, chunked, keep_alive = parse_head(head)
        if 100 <= status < 200 or status in NO_BODY_STATUSES:
            size = 0
        elif chunked:
            size = await _read_chunked(self.reader)
        elif length is not None:
            size = len(await self.reader.readexactly(length))
        else:  # the body ends when the server closes the connection
            size = len(await self.reader.read())
            keep_alive = False
        if not keep_alive:
            self.close()
        return status, size

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


def http_get(url: str, path: str, headers: Mapping[str, str], timeout: float) -> tuple[int, bytes]:
    """GET ``url + path`` on a fresh connection: (status, body). Raises OSError or http.client errors."""
    endpoint = Endpoint.from_url(url)
    cls = http.client.HTTPSConnection if endpoint.tls else http.client.HTTPConnection
    conn = cls(endpoint.host, endpoint.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
