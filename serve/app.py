"""The HTTP server: ``create_app(models, settings)`` returns a FastAPI app serving one or more bundles.

Handlers stay thin (decode -> submit -> await -> encode); each model's backend lives in its own
:class:`~kiln.serve.batcher.Batcher` worker thread. The app wires one :class:`~kiln.serve.registry.Registry`
of served models to a router per protocol; routes find the registry, settings and metrics on
``request.app.state``:

- native (:mod:`kiln.serve.v1`): ``POST /v1/models/{name}/predict`` (multipart ``file`` fields or JSON
  base64), ``GET /v1/models``, ``GET /v1/models/{name}``
- KServe v2 / Open Inference Protocol (:mod:`kiln.serve.v2`): ``/v2``, ``/v2/health/live``,
  ``/v2/health/ready``, ``/v2/models/{name}``, ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``
- :mod:`kiln.serve.health`: ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), ``/`` (a page to try an
  image); :mod:`kiln.serve.docs`: ``/docs`` and ``/redoc`` (OpenAPI) from package files

Every error is ``{"error": {"code": ..., "message": ..., "request_id": ...}}`` (:mod:`kiln.serve.errors`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln import __version__
from kiln.bundle import Bundle
from kiln.serve import docs, errors, grpc, health, kserve, v1, v2
from kiln.serve.health import WorkerReadiness
from kiln.serve.images import DecodePool
from kiln.serve.metrics import Metrics
from kiln.serve.middleware import RequestGate
from kiln.serve.registry import Loader, LoadErrorHook, Registry
from kiln.serve.settings import Settings
from kiln.serve.triton_ext import Stats

log = logging.getLogger("kiln.serve")


@asynccontextmanager
async def _lifespan(app: FastAPI, on_load_error: LoadErrorHook | None) -> AsyncIterator[None]:
    registry: Registry = app.state.registry
    if app.state.api_key is None:
        log.warning("no API key (--api-key / KILN_API_KEY is unset or empty): every endpoint is open to "
                    "anyone who can reach this server")
    registry.start()
    watcher = asyncio.create_task(_watch_loads(app, on_load_error))
    if app.state.serve_when_loaded:
        await watcher  # uvicorn starts accepting once the lifespan has started
    grpc_server = await grpc.start(app) if app.state.settings.grpc_port is not None else None
    try:
        yield
    finally:
        watcher.cancel()
        if grpc_server is not None:  # finish in-flight gRPC calls before the batchers drain
            await grpc_server.stop(app.state.settings.timeout_s)
        if app.state.workers is not None:
            app.state.workers.unmark()
        # Uvicorn has finished in-flight requests by now; drain whatever is still queued.
        await registry.close(app.state.settings.timeout_s)
        app.state.decode_slots.close()


async def _watch_loads(app: FastAPI, on_load_error: LoadErrorHook | None) -> None:
    registry: Registry = app.state.registry
    await registry.watch_loads(app.state.metrics.loaded, on_load_error)
    if app.state.freeze_gc:
        # Everything alive now (modules, the framework, the loaded models) lives as long as the process:
        # moved out of the collector's view, a full collection scans only what requests created since,
        # instead of stalling the event loop ~50 ms for every object the process holds (measured with
        # clients disconnecting mid-upload, whose exceptions leave reference cycles behind).
        gc.collect()  # garbage from loading (tracebacks, cycles) must not become permanent
        gc.freeze()
        log.debug("gc.freeze(): %d objects moved to the permanent generation", gc.get_freeze_count())
    workers: WorkerReadiness | None = app.state.workers
    if workers is not None and registry.not_ready_reason() is None:
        workers.mark_ready()


class KilnApp(FastAPI):
    """FastAPI behind kiln's own front: CORS (when configured), then
    :class:`~kiln.serve.middleware.RequestGate`, which answers the hot predict route itself
    (:class:`kiln.serve.v1.FastPredict`) and hands everything else to FastAPI. Outside the framework, the
    gate's checks run before any of its per-request layers, and the hot route skips them all."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None or scope["type"] == "lifespan":
            await super().__call__(scope, receive, send)
        else:
            await self.front(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def create_app(
    models: Sequence[tuple[str, str | os.PathLike[str] | Bundle]],
    settings: Settings | None = None,
    *,
    loader: Loader | None = None,
    on_load_error: LoadErrorHook | None = None,
    workers: WorkerReadiness | None = None,
    freeze_gc: bool = False,
    serve_when_loaded: bool = False,
) -> FastAPI:
    """Build the server for ``models`` (name, bundle path). Backends load in their worker threads when
    the app starts; ``/readyz`` turns ready once every model is loaded and warmed up.

    ``loader(bundle, settings) -> Backend`` defaults to :func:`kiln.runtime.load`; ``on_load_error``
    is called (from the event loop) when a model fails to load. ``workers``: this process is one of
    several (``kiln serve --workers N``); ``/readyz`` waits for all of them and every answer carries an
    ``X-Kiln-Worker`` header with the pid that served it. ``freeze_gc``: once every model has loaded,
    ``gc.freeze()`` the process's long-lived objects (what ``kiln serve`` does; an app embedded in
    another program leaves its collector alone). ``serve_when_loaded``: the app's startup waits until every
    model is loaded and warmed up, so the server accepts no connection before (a worker replacing one that
    died, on a port its siblings serve: no request of theirs meets a model still loading).
    """
    settings = settings or Settings()
    registry = Registry.build(models, settings, loader)
    metrics = Metrics()
    for m in registry:
        metrics.watch(m)

    app = KilnApp(
        docs_url=None,  # kiln.serve.docs serves them from package files: /docs renders with no internet
        redoc_url=None,
        title="kiln",
        version=__version__,
        description="Image classification and detection served from kiln bundles.",
        lifespan=partial(_lifespan, on_load_error=on_load_error),
        responses=errors.OPENAPI_RESPONSES,
    )
    app.state.registry = registry
    app.state.models = registry.models  # by name, for callers that reach into a model's batcher
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.stats = Stats(registry)  # Triton's statistics extension (REST and gRPC)
    app.state.api_key = settings.api_key_value()
    app.state.workers = workers
    app.state.freeze_gc = freeze_gc
    app.state.serve_when_loaded = serve_when_loaded
    # The decode threads and their bounded, first-come-first-served wait (kiln.serve.images.prepare).
    app.state.decode_slots = DecodePool(settings.decode_threads, settings.max_decode_queue)
    errors.install(app)
    docs.install(app)
    # The gate sits inside CORS: its 401 and 413 answers carry the CORS headers a browser needs to read
    # them, and a CORS preflight (which carries no API key) never reaches it.
    front: ASGIApp = RequestGate(app.framework, limit=settings.max_body_bytes, metrics=metrics,
                                 models=registry.models,
                                 api_key=app.state.api_key, body_timeout=settings.body_timeout_s,
                                 worker=str(os.getpid()) if workers is not None else None,
                                 fast=v1.FastPredict(app).match)
    if settings.cors_origins:
        front = CORSMiddleware(
            front,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.front = front
    # v1 first: routing tries each route in turn and predict is the hot one. KServe V1's POST
    # /v1/models/{name}:predict is a full match where GET /v1/models/{name} is only a partial one (405).
    for router in (v1.router, kserve.router, health.router, v2.router):
        # Not include_router: FastAPI keeps an included router as a branch that is matched again on every
        # request. Each APIRoute already carries its router's tags, dependencies and error responses, so
        # placing the routes on the app keeps routing one flat table (app.dependency_overrides skips them).
        app.router.routes.extend(router.routes)
    return app


__all__ = ["create_app"]
