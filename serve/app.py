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
  image); FastAPI serves ``/docs`` (OpenAPI)

Every error is ``{"error": {"code": ..., "message": ..., "request_id": ...}}`` (:mod:`kiln.serve.errors`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from kiln import __version__
from kiln.bundle import Bundle
from kiln.serve import errors, health, v1, v2
from kiln.serve.metrics import Metrics
from kiln.serve.middleware import RequestGate
from kiln.serve.registry import Loader, LoadErrorHook, Registry
from kiln.serve.settings import Settings


@asynccontextmanager
async def _lifespan(app: FastAPI, on_load_error: LoadErrorHook | None) -> AsyncIterator[None]:
    registry: Registry = app.state.registry
    registry.start()
    watcher = asyncio.create_task(registry.watch_loads(app.state.metrics.loaded, on_load_error))
    try:
        yield
    finally:
        watcher.cancel()
        # Uvicorn has finished in-flight requests by now; drain whatever is still queued.
        await registry.close(app.state.settings.timeout_s)


def create_app(
    models: Sequence[tuple[str, str | os.PathLike[str] | Bundle]],
    settings: Settings | None = None,
    *,
    loader: Loader | None = None,
    on_load_error: LoadErrorHook | None = None,
) -> FastAPI:
    """Build the server for ``models`` (name, bundle path). Backends load in their worker threads when
    the app starts; ``/readyz`` turns ready once every model is loaded and warmed up.

    ``loader(bundle, settings) -> Backend`` defaults to :func:`kiln.runtime.load`; ``on_load_error``
    is called (from the event loop) when a model fails to load.
    """
    settings = settings or Settings()
    registry = Registry.build(models, settings, loader)
    metrics = Metrics()
    for m in registry:
        metrics.watch(m)

    app = FastAPI(
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
    app.state.api_key = settings.api_key_value()
    errors.install(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(RequestGate, limit=settings.max_body_bytes, metrics=metrics, models=registry.models)
    for router in (health.router, v1.router, v2.router):
        # Not include_router: FastAPI keeps an included router as a branch that is matched again on every
        # request. Each APIRoute already carries its router's tags, dependencies and error responses, so
        # placing the routes on the app keeps routing one flat table (app.dependency_overrides skips them).
        app.router.routes.extend(router.routes)
    return app


__all__ = ["create_app"]
