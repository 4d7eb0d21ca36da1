"""``kiln serve --workers N``: N server processes answering on one port, each with its own batchers and
backends (on a CPU, N event loops decode and encode in parallel where one would be the bottleneck).

A pre-fork parent binds the listening socket once and starts N workers (``spawn``: a fresh interpreter
each, so no thread or runtime state is copied) that all accept on it; the kernel hands each connection
to one of them. The parent serves no requests. It owns two temporary folders and removes them at exit:

- ``PROMETHEUS_MULTIPROC_DIR``: the workers' metric samples, so ``/metrics`` on any worker shows all of
  them (:mod:`kiln.serve.metrics`);
- a readiness folder where each ready worker leaves a file (:class:`~kiln.serve.health.WorkerReadiness`),
  so ``/readyz`` says ready only once every worker is.

SIGTERM (or SIGINT) of the parent is passed to every worker, which drains as one server does (``/readyz``
503 for ``drain_s``, then in-flight requests finish); the parent exits 0 once all have exited 0.

The parent supervises its workers: one that exits (killed, crashed, or even with status 0) after the
server came up is replaced, with its reason logged and a back-off between restarts; ``/readyz`` answers
503 until the replacement is ready, while the other workers keep serving. A worker that fails while the
server starts stops the start, since a bundle that cannot load would fail again.

With ``--grpc-port``, each worker listens on the gRPC port with ``SO_REUSEPORT`` and the kernel spreads
connections across them as it does on the shared HTTP socket; the parent holds the port (bound, not
listening) so no other program takes it between restarts.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from kiln.errors import BackendUnavailable, KilnError
from kiln.serve.app import create_app
from kiln.serve.health import WorkerReadiness
from kiln.serve.http_server import DrainingServer, build_server, refuse_new_connections
from kiln.serve.settings import Settings

log = logging.getLogger("kiln.serve")

Models = Sequence[tuple[str, str]]


def serve_socket(models: Models, settings: Settings, sock: socket.socket, *, access_log: bool = False,
                 ready_dir: str | None = None, serve_when_loaded: bool = False) -> int:
    """Serve ``models`` (name, bundle path) on the bound ``sock`` until SIGTERM; returns 0 after a clean
    shutdown. Raises :class:`BackendUnavailable` when a model cannot load. One process of ``kiln
    serve``, or one worker of several when ``ready_dir`` is given; ``serve_when_loaded``: accept
    connections only once every model is ready (a replacement worker)."""
    load_errors: list[str] = []
    server: DrainingServer | None = None
    paths = dict(models)

    def on_load_error(name: str, exc: BaseException) -> None:
        load_errors.append(f"model '{name}' ({paths[name]}): {exc}")
        if server is not None:
            server.should_exit = True

    workers = WorkerReadiness(ready_dir, settings.workers) if ready_dir is not None else None
    app = create_app(list(models), settings, on_load_error=on_load_error, workers=workers, freeze_gc=True,
                     serve_when_loaded=serve_when_loaded)
    server = build_server(app, app.state.registry, settings, access_log=access_log,
                          own_listener=ready_dir is None)
    # Uvicorn re-raises the signal it shut down on; a Python handler turns SIGTERM into a clean exit 0.
    previous = signal.signal(signal.SIGTERM, lambda sig, _frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if load_errors:
        raise BackendUnavailable("; ".join(load_errors))
    if not server.started:
        raise KilnError("the server did not start; see the log above")
    return 0


def _worker(models: Models, settings: Settings, sock: socket.socket, access_log: bool, ready_dir: str,
            log_level: int, replacement: bool) -> None:
    """A worker process: its own process group, so a terminal's Ctrl-C reaches the parent alone and
    each worker gets one signal, the one the parent passes on."""
    os.setpgid(0, 0)
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s [worker {os.getpid()}] %(message)s")
    _exit_with_parent()
    try:
        code = serve_socket(models, settings, sock, access_log=access_log, ready_dir=ready_dir,
                            serve_when_loaded=replacement)
    except KilnError as exc:
        log.error("%s", exc)
        code = 2
    finally:
        sock.close()
    raise SystemExit(code)


def _exit_with_parent(period: float = 1.0) -> None:
    """Stop (gracefully) if the parent dies without passing a signal on, so no orphan keeps the port."""
    parent = os.getppid()

    def check() -> None:
        while True:
            threading.Event().wait(period)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=check, name="kiln-parent-watch", daemon=True).start()


# Restart back-off: the first replacement after RESTART_BASE_S, doubling for each death of a worker that
# ran less than STABLE_S, at most RESTART_MAX_S (a worker that crashes at once does not spin).
RESTART_BASE_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 60.0
# How often the parent looks at the readiness folder while workers start.
READY_POLL_S = 0.5


@dataclass
class _Slot:
    """One of the ``--workers`` places: its current process, and how often it died recently."""

    index: int
    proc: multiprocessing.process.BaseProcess | None = None
    pid: int = 0
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None


def _reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode}"


def run_workers(models: Models, settings: Settings, sock: socket.socket, *, access_log: bool = False) -> int:
    """Start ``settings.workers`` workers on ``sock`` and supervise them until a signal stops them all.

    A worker that fails before every worker has been ready once stops the start (a bundle that cannot
    load would fail again): the others are stopped and :class:`KilnError` names it. Afterwards a worker
    that exits, whatever its status, is replaced after a back-off (:data:`RESTART_BASE_S` doubling up to
    :data:`RESTART_MAX_S` while replacements keep dying within :data:`STABLE_S`); ``/readyz`` answers 503
    until the replacement is ready. Returns 0 once every worker has exited 0 after SIGTERM or SIGINT."""
    metrics_dir = tempfile.mkdtemp(prefix="kiln-metrics-")
    ready_dir = tempfile.mkdtemp(prefix="kiln-ready-")
    # Read by prometheus_client when a worker imports it; a spawned worker inherits the environment.
    previous_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    args = (list(models), settings, sock, access_log, ready_dir, logging.getLogger().level)
    slots = [_Slot(i) for i in range(settings.workers)]
    stopping: list[int] = []

    def forward(sig: int, _frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not stopping and settings.drain_s > 0:
            # The workers drain for drain_s, then accept what is queued on the shared listener for
            # ACCEPT_GRACE_S before closing their copies (closing the last copy would reset the queue),
            # while new connections are refused from drain_s on.
            refuse = threading.Timer(settings.drain_s, refuse_new_connections, (sock,))
            refuse.daemon = True
            refuse.start()
        stopping.append(sig)
        for slot in slots:
            p = slot.proc
            if p is not None and p.pid is not None and p.exitcode is None:
                os.kill(p.pid, sig)

    def start(slot: _Slot, replacement: bool = False) -> None:
        # A replacement accepts on the shared sockets only once its models are ready: its siblings serve.
        slot.proc = ctx.Process(target=_worker, name=f"kiln-worker-{slot.index}", args=(*args, replacement))
        slot.proc.start()
        slot.pid = slot.proc.pid or 0
        slot.started = time.monotonic()
        slot.restart_at = None
        if stopping:  # a signal came while it started: pass it on too
            os.kill(slot.pid, stopping[0])

    handlers = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for slot in slots:
            start(slot)
        log.info("started %d workers: pids %s", len(slots), ", ".join(str(s.pid) for s in slots))
        failed = _supervise(slots, stopping, metrics_dir, ready_dir, start,
                            lambda: forward(signal.SIGTERM, None))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for slot in slots:
            if slot.proc is not None and slot.proc.exitcode is None:
                slot.proc.kill()
                slot.proc.join()
        if previous_env is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous_env
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(ready_dir, ignore_errors=True)
    if failed is not None:
        raise KilnError(f"worker {failed[0]} {_reason(failed[1])}; see the log above")
    return 0


def _supervise(slots: Sequence[_Slot], stopping: list[int], metrics_dir: str, ready_dir: str,
               start: Callable[[_Slot, bool], None],
               stop_all: Callable[[], None]) -> tuple[int, int | None] | None:
    """Replace workers that exit until a signal (``stopping``) is passed on, then wait for every worker
    to exit. Returns (pid, exit code) of a worker that failed the start or exited non-zero while
    stopping, else ``None``."""
    failed: tuple[int, int | None] | None = None
    up = False  # every worker has been ready once
    while True:
        # Every process not yet handled below, dead or not: a dead one's sentinel is ready, so the wait
        # returns at once for it (leaving out one that died since the last pass would miss its death).
        alive = [s.proc for s in slots if s.proc is not None]
        if stopping and not alive:
            return failed
        now = time.monotonic()
        waits = [max(0.0, s.restart_at - now) for s in slots if s.restart_at is not None and not stopping]
        if not up:
            waits.append(READY_POLL_S)
        timeout = min(waits, default=None)
        if alive:
            wait([p.sentinel for p in alive], timeout)
        elif timeout:
            time.sleep(timeout)
        if not up:
            ready = {int(name) for name in os.listdir(ready_dir) if name.isdigit()}
            up = all(s.proc is not None and s.proc.pid in ready for s in slots)
            if up:
                log.info("all %d workers ready", len(slots))
        now = time.monotonic()
        for slot in slots:
            p = slot.proc
            if p is not None and p.exitcode is not None:
                slot.proc = None
                p.join()
                mark_process_dead(slot.pid, metrics_dir)  # its live gauges (queue depth) no longer count
                with contextlib.suppress(FileNotFoundError):  # a worker that died did not remove its own
                    os.unlink(os.path.join(ready_dir, str(slot.pid)))
                if stopping:
                    if p.exitcode != 0 and failed is None:
                        failed = (slot.pid, p.exitcode)
                    continue
                if not up:
                    failed = (slot.pid, p.exitcode)
                    log.error("worker %d %s while starting; stopping the others", slot.pid,
                              _reason(p.exitcode))
                    stop_all()
                    continue
                ran = now - slot.started
                if ran >= STABLE_S:
                    slot.failures = 0
                delay = min(RESTART_MAX_S, RESTART_BASE_S * 2 ** slot.failures)
                slot.failures += 1
                slot.restart_at = now + delay
                log.error("worker %d %s after %.1f s; starting a new one in %.1f s (not ready until then)",
                          slot.pid, _reason(p.exitcode), ran, delay)
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at and not stopping:
                start(slot, True)
                log.info("started worker %d in place of the one that exited", slot.pid)


__all__ = ["run_workers", "serve_socket"]
