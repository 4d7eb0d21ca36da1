"""OpenAPI docs that render with no internet: Swagger UI and ReDoc from package files.

FastAPI's own ``/docs`` loads Swagger UI's script and style from a CDN. This follows FastAPI's recipe for
self-hosting them (``get_swagger_ui_html`` / ``get_redoc_html`` pointed at local files), with the
files the ``fastapi-offline`` package ships, served under :data:`kiln.serve.auth.DOCS_ASSETS`.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from kiln.serve.auth import DOCS_ASSETS

ASSETS = files("fastapi_offline") / "static"


def install(app: FastAPI) -> None:
    """``/docs``, ``/docs/oauth2-redirect`` and ``/redoc`` on ``app`` (created with ``docs_url=None,
    redoc_url=None``), with their assets under DOCS_ASSETS."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(ASSETS)), name="docs-assets")
    redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=redirect,
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )

    @app.get(redirect, include_in_schema=False)
    async def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


__all__ = ["ASSETS", "install"]
