"""A tiny stand-in for `kiln serve` on 127.0.0.1: the predict, v2 infer and /metrics routes the load
generator uses, with a real Prometheus batch size histogram, scripted error statuses, chunked answers
and connections it closes (saying so, or not), and a count of requests per connection."""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Histogram, generate_latest

MODEL = "tiny"
SHAPE = [1, 8, 8]


@dataclass
class FakeState:
    fail_every: int = 0  # every Nth predict answers fail_status (0: never)
    fail_status: int = 503
    calls: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    bad_bodies: int = 0
    api_key: str | None = None  # when set, every route wants "Authorization: Bearer KEY" (as kiln's /metrics)
    chunked: bool = False  # predict answers with Transfer-Encoding: chunked (and a trailer field)
    close_every: int = 0  # every Nth predict answer says "Connection: close" and closes (0: never)
    drop_every: int = 0  # every Nth predict answer is followed by a close without saying so (0: never)
    posts_per_connection: list[int] = field(default_factory=list)  # one entry per connection that was opened
    lock: threading.Lock = field(default_factory=threading.Lock)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.batch = Histogram("kiln_batch_size", "items per inference batch", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)


class _Handler(BaseHTTPRequestHandler):
    """The routes; ``state`` is bound per server by :func:`_handler`."""

    state: FakeState
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn does

    def log_message(self, *args: object) -> None:
        return None

    def setup(self) -> None:
        super().setup()
        with self.state.lock:
            self.conn_index = len(self.state.posts_per_connection)
            self.state.posts_per_connection.append(0)

    def _send(self, status: int, body: bytes, ctype: str = "application/json", *, close: bool = False,
              chunked: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if close:
            self.send_header("Connection", "close")  # http.server then closes after this answer
        if not chunked:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        half = len(body) // 2
        for part in (body[:half], body[half:]):
            self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\nX-Trailer: done\r\n\r\n")

    def _authorized(self) -> bool:
        if self.state.api_key is None or self.headers.get("Authorization") == f"Bearer {self.state.api_key}":
            return True
        self._send(401, b'{"error": {"code": "unauthorized", "message": "missing or wrong API key"}}')
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._authorized():
            return
        if self.path == "/metrics":
            self._send(200, generate_latest(self.state.registry), "text/plain; version=0.0.4")
        elif self.path == f"/v2/models/{MODEL}":
            meta = {"name": MODEL, "platform": "fake", "parameters": {"backend": "fake", "precision": "fp32"},
                    "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, *SHAPE]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]}
            self._send(200, json.dumps(meta).encode())
        else:
            self._send(404, b'{"error": {"code": "not_found", "message": "no such route"}}')

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self._authorized():
            return
        if self.path == f"/v1/models/{MODEL}/predict":
            items = self._predict_items(body)
        elif self.path == f"/v2/models/{MODEL}/infer":
            req = json.loads(body)
            t = req["inputs"][0]
            items = t["shape"][0] if t["shape"][1:] == SHAPE and len(t["data"]) == t["shape"][0] * 64 else 0
        else:
            self._send(404, b'{"error": {"code": "not_found", "message": "unknown model"}}')
            return
        n, status = self._record(items)
        if status == 200:
            self.state.batch.labels(model=MODEL).observe(items)
        body = json.dumps({"model": MODEL, "predictions": [[]] * items}).encode()
        self._send(status, body, close=bool(self.state.close_every and n % self.state.close_every == 0),
                   chunked=self.state.chunked)
        if self.state.drop_every and n % self.state.drop_every == 0:
            self.close_connection = True

    def _record(self, items: int) -> tuple[int, int]:
        """Count the call; returns its number and the status it gets (400 without a valid item, the
        scripted failure status on every ``fail_every``-th call)."""
        state = self.state
        with state.lock:
            state.calls += 1
            state.posts_per_connection[self.conn_index] += 1
            n = state.calls
            fail = state.fail_every and n % state.fail_every == 0
            status = 400 if items == 0 else (state.fail_status if fail else 200)
            state.statuses[status] += 1
            state.bad_bodies += items == 0
        return n, status

    def _predict_items(self, body: bytes) -> int:
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            return body.count(b'name="file"')
        try:
            images = json.loads(body)["images"]
            return sum(1 for im in images if base64.b64decode(im, validate=True).startswith(b"\x89PNG"))
        except (ValueError, KeyError):
            return 0


def _handler(state: FakeState) -> type[BaseHTTPRequestHandler]:
    return type("Handler", (_Handler,), {"state": state})


@contextmanager
def fake_server(state: FakeState) -> Iterator[str]:
    """Serve on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
