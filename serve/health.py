"""Probes and operations: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics`` (Prometheus)
and the page at ``/`` to try an image."""

from __future__ import annotations

import importlib.resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from kiln.serve.auth import AUTH
from kiln.serve.errors import OPENAPI_RESPONSES, error_response, request_id
from kiln.serve.metrics import Metrics
from kiln.serve.registry import Registry
from kiln.serve.schemas import Health

router = APIRouter(responses=OPENAPI_RESPONSES)


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    html = importlib.resources.files("kiln.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(html)


@router.get("/healthz", response_model=Health, tags=["health"], summary="liveness: the process answers")
async def healthz(request: Request) -> Health:
    return Health(status="stopping" if request.app.state.registry.stopping else "ok")


@router.get("/readyz", response_model=Health, tags=["health"],
            summary="readiness: every model loaded and warmed up (503 otherwise)")
async def readyz(request: Request) -> Any:
    registry: Registry = request.app.state.registry
    reason = registry.not_ready_reason()
    if reason is not None:
        return error_response(503, "not_ready", reason, request_id(request))
    return Health(status="ok", models={m.name: "ready" for m in registry})


@router.get("/metrics", tags=["health"], summary="Prometheus metrics", dependencies=AUTH)
async def prometheus(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


__all__ = ["router"]
