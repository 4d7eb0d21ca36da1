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
503 for ``drain_s``, then in-flight requests finish); the parent exits 0 once all have exited 0. A
worker that dies on its own stops the others and the parent fails with its exit status.
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
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from kiln.errors import BackendUnavailable, KilnError
from kiln.serve.app import create_app
from kiln.serve.health import WorkerReadiness
from kiln.serve.http_server import DrainingServer, build_server
from kiln.serve.settings import Settings

log = logging.getLogger("kiln.serve")

Models = Sequence[tuple[str, str]]


def serve_socket(models: Models, settings: Settings, sock: socket.socket, *, access_log: bool = False,
                 ready_dir: str | None = None) -> int:
    """Serve ``models`` (name, bundle path) on the bound ``sock`` until SIGTERM; returns 0 after a clean
    shutdown. Raises :class:`BackendUnavailable` when a model cannot load. One process of ``kiln
    serve``, or one worker of several when ``ready_dir`` is given."""
    load_errors: list[str] = []
    server: DrainingServer | None = None
    paths = dict(models)

    def on_load_error(name: str, exc: BaseException) -> None:
        load_errors.append(f"model '{name}' ({paths[name]}): {exc}")
        if server is not None:
            server.should_exit = True

    workers = WorkerReadiness(ready_dir, settings.workers) if ready_dir is not None else None
    app = create_app(list(models), settings, on_load_error=on_load_error, workers=workers, freeze_gc=True)
    server = build_server(app, app.state.registry, settings, access_log=access_log)
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
            log_level: int) -> None:
    """A worker process: its own process group, so a terminal's Ctrl-C reaches the parent alone and
    each worker gets one signal, the one the parent passes on."""
    os.setpgid(0, 0)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [worker {os.getpid()}] %(message)s")
    _exit_with_parent()
    try:
        code = serve_socket(models, settings, sock, access_log=access_log, ready_dir=ready_dir)
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


def run_workers(models: Models, settings: Settings, sock: socket.socket, *, access_log: bool = False) -> int:
    """Start ``settings.workers`` workers on ``sock`` and supervise them until they have all exited."""
    metrics_dir = tempfile.mkdtemp(prefix="kiln-metrics-")
    ready_dir = tempfile.mkdtemp(prefix="kiln-ready-")
    # Read by prometheus_client when a worker imports it; a spawned worker inherits the environment.
    previous_env = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, name=f"kiln-worker-{i}",
                    args=(list(models), settings, sock, access_log, ready_dir, logging.getLogger().level))
        for i in range(settings.workers)
    ]
    stopping: list[int] = []

    def forward(sig: int, _frame: FrameType | None) -> None:
        stopping.append(sig)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, sig)

    handlers = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        log.info("started %d workers: pids %s", len(procs), ", ".join(str(p.pid) for p in procs))
        failed = _supervise(procs, stopping, metrics_dir, ready_dir, lambda: forward(signal.SIGTERM, None))
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
        if previous_env is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous_env
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(ready_dir, ignore_errors=True)
    if failed is not None:
        raise KilnError(f"worker {failed.pid} exited with status {failed.exitcode}; see the log above")
    return 0


def _supervise(procs: Sequence[multiprocessing.process.BaseProcess], stopping: list[int], metrics_dir: str,
               ready_dir: str, stop_all: Callable[[], None]) -> multiprocessing.process.BaseProcess | None:
    """Wait for every worker to exit; the first that exits non-zero (or before a signal) is returned, and
    the others are told to stop."""
    failed = None
    alive = list(procs)
    while alive:
        wait([p.sentinel for p in alive])
        for p in [p for p in alive if p.exitcode is not None]:
            alive.remove(p)
            p.join()
            mark_process_dead(p.pid, metrics_dir)  # its live gauges (queue depth) no longer count
            with contextlib.suppress(FileNotFoundError):  # a worker that died did not remove its own
                os.unlink(os.path.join(ready_dir, str(p.pid)))
            if failed is None and (p.exitcode != 0 or not stopping):
                failed = p
                log.error("worker %d exited with status %s; stopping the others", p.pid, p.exitcode)
                if not stopping:
                    stop_all()
    return failed


__all__ = ["run_workers", "serve_socket"]
