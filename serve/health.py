"""Probes and operations: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics`` (Prometheus)
and the page at ``/`` to try images, with its test panel (``/static/testpanel.js`` and ``.css``, the
component ``kiln studio``'s Test page serves from here too)."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from kiln.serve.errors import OPENAPI_RESPONSES, error_response, request_id
from kiln.serve.metrics import Metrics
from kiln.serve.registry import Registry
from kiln.serve.schemas import Health

router = APIRouter(responses=OPENAPI_RESPONSES)
STATIC = importlib.resources.files("kiln.serve") / "static"
# The test panel: one component (a predict(files) callback in, bars and boxes out) for this page and
# the studio.
PANEL_ASSETS = {"testpanel.js": "text/javascript", "testpanel.css": "text/css"}


class WorkerReadiness:
    """Readiness across ``kiln serve --workers N`` processes: each worker writes a file named after its
    pid into a folder the parent created once all of its models are ready, and removes it when it stops
    (the parent removes a dead worker's). A probe reaches one worker, so ``/readyz`` counts the files."""

    def __init__(self, folder: str | os.PathLike[str], count: int) -> None:
        self.folder = Path(folder)
        self.count = count
        self.mine = self.folder / str(os.getpid())

    def mark_ready(self) -> None:
        self.mine.touch()

    def unmark(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.mine.unlink()

    def not_ready_reason(self) -> str | None:
        ready = sum(1 for _ in self.folder.iterdir()) if self.folder.is_dir() else 0
        return None if ready >= self.count else f"workers ready: {ready} of {self.count}"


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(STATIC.joinpath("index.html").read_text(encoding="utf-8"))


def panel_asset(name: str) -> Response:
    """``testpanel.js`` or ``testpanel.css`` from this package (404 for any other name)."""
    media = PANEL_ASSETS.get(name)
    if media is None:
        return Response(status_code=404)
    return Response(STATIC.joinpath(name).read_bytes(), media_type=media,
                    headers={"Cache-Control": "no-cache"})


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    return panel_asset(name)


@router.get("/healthz", response_model=Health, tags=["health"], summary="liveness: the process answers")
async def healthz(request: Request) -> Health:
    return Health(status="stopping" if request.app.state.registry.stopping else "ok")


@router.get("/readyz", response_model=Health, tags=["health"],
            summary="readiness: every model loaded and warmed up (503 otherwise)")
async def readyz(request: Request) -> Any:
    registry: Registry = request.app.state.registry
    # An open probe: which models are served (and why one failed) is for key holders only.
    authorized = request.scope.get("kiln.authorized", True)
    reason = registry.not_ready_reason(names=authorized)  # "shutting down" from SIGTERM on, through the drain
    workers: WorkerReadiness | None = request.app.state.workers
    if reason is None and workers is not None:
        reason = workers.not_ready_reason()
    if reason is not None:
        return error_response(503, "not_ready", reason, request_id(request))
    return Health(status="ok", models={m.name: "ready" for m in registry} if authorized else {})


@router.get("/metrics", tags=["health"],
            summary="Prometheus metrics (needs the API key, checked by RequestGate)", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def prometheus(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


__all__ = ["PANEL_ASSETS", "panel_asset", "router"]
