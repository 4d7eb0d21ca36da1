"""``build_app``: the studio's FastAPI application, its gate and its routers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from kiln.errors import KilnError
from kiln.serve import health as serve_page
from kiln.studio import routes_data, routes_models, routes_runs, routes_test
from kiln.studio.config import StudioConfig
from kiln.studio.security import Gate
from kiln.studio.state import Studio

log = logging.getLogger("kiln.studio")
STATIC = resources.files("kiln.studio") / "static"


def build_app(cfg: StudioConfig, *, start_runner: bool = True) -> FastAPI:
    """The studio over ``cfg.workspace``. ``start_runner`` False leaves the job runner's thread off
    (tests drive it with ``app.state.studio.runner.tick()``)."""
    studio = Studio(cfg, start_runner=start_runner)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        studio.open()
        try:
            yield
        finally:
            studio.close()

    app = FastAPI(title="kiln studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio
    for module in (routes_data, routes_runs, routes_models, routes_test):
        app.include_router(module.router)
    # the test panel is kiln serve's component, served from that package: one file for both pages
    app.add_api_route("/static/testpanel.{ext}", _test_panel, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(KilnError, _kiln_error)  # type: ignore[arg-type]
    app.add_exception_handler(ModuleNotFoundError, _missing_module)  # type: ignore[arg-type]
    app.add_middleware(Gate, cfg=cfg)
    return app


def _test_panel(ext: str) -> Response:
    return serve_page.panel_asset(f"testpanel.{ext}")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errs = exc.errors()
    first: dict[str, Any] = errs[0] if errs else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)


async def _kiln_error(request: Request, exc: KilnError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


async def _missing_module(request: Request, exc: ModuleNotFoundError) -> JSONResponse:
    return JSONResponse({
        "error": f"{exc.name} is not installed (pip install 'kiln-vision[train,export,serve]')"},
                        status_code=501)
