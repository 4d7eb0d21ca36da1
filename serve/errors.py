"""Every error the server answers is ``{"error": {"code", "message", "request_id"}}`` (on /v2 routes the
protocol's ``{"error": "<message>"}``).

:data:`ERRORS` is the one table from a typed exception to its HTTP status, machine-readable code and
gRPC status, for every protocol (:func:`lookup`); :func:`install` registers the HTTP handlers that
apply it (and shape FastAPI's own errors the same way), :mod:`kiln.serve.grpc` aborts with its column.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kiln.errors import ConfigError, InputError, KilnError
from kiln.processing import ImageDecodeError
from kiln.serve.batcher import (
    BatcherClosed,
    ClientDisconnected,
    InferenceFailed,
    ModelNotReady,
    QueueFull,
    RequestTimeout,
)
from kiln.serve.registry import ModelNotFound
from kiln.serve.schemas import ErrorResponse

log = logging.getLogger("kiln.serve")

# Most specific first: the first isinstance match decides the answer. Any other KilnError is a 400
# invalid_request, INVALID_ARGUMENT over gRPC. gRPC statuses are grpc.StatusCode member names.
ERRORS: list[tuple[type[BaseException], int, str, str]] = [
    (ModelNotFound, 404, "model_not_found", "NOT_FOUND"),
    (ImageDecodeError, 400, "invalid_image", "INVALID_ARGUMENT"),
    (InputError, 400, "invalid_input", "INVALID_ARGUMENT"),
    (QueueFull, 503, "queue_full", "UNAVAILABLE"),
    (BatcherClosed, 503, "shutting_down", "UNAVAILABLE"),
    (ModelNotReady, 503, "not_ready", "UNAVAILABLE"),
    (RequestTimeout, 504, "timeout", "DEADLINE_EXCEEDED"),
    (InferenceFailed, 500, "inference_failed", "INTERNAL"),
    (ClientDisconnected, 499, "client_closed_request", "CANCELLED"),
    (ConfigError, 400, "invalid_request", "INVALID_ARGUMENT"),
]
_OTHER = (400, "invalid_request", "INVALID_ARGUMENT")

# The gRPC status of the HTTP errors raised by code the protocols share (the image budget's 413, ...).
GRPC_FOR_HTTP = {401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


def lookup(exc: BaseException) -> tuple[int, str, str]:
    """``exc``'s HTTP status, code and gRPC status name from :data:`ERRORS`."""
    return next(((s, c, g) for cls, s, c, g in ERRORS if isinstance(exc, cls)), _OTHER)


# Codes for the HTTP errors Starlette raises itself (unknown route, wrong method, ...).
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                408: "request_timeout", 413: "body_too_large", 415: "unsupported_media_type",
                431: "header_too_large", 500: "internal_error", 503: "unavailable"}


# The error shape in the OpenAPI description of every route.
OPENAPI_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorResponse, "description": "error"}}


class ApiError(StarletteHTTPException):
    """An HTTP error with a machine-readable code; passes through FastAPI's body parsing untouched."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def error_response(
    status: int, code: str, message: str, request_id: str | None, headers: Mapping[str, str] | None = None,
    path: str | None = None,
) -> JSONResponse:
    """kiln's error shape; on a KServe v2 or V1 ``path`` the protocol's ``{"error": "<message>"}``, which
    Triton and KServe clients parse."""
    body: dict[str, Any] = {"error": {"code": code, "message": message, "request_id": request_id}}
    if path is not None and (is_v2(path) or is_kserve_v1(path)):
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def is_kserve_v1(path: str) -> bool:
    """KServe V1's ``/v1/models/{name}:predict`` (beside kiln's native ``/v1``)."""
    return path.startswith("/v1/models/") and path.endswith(":predict")


def request_id(request: Request) -> str | None:
    """The id :class:`~kiln.serve.middleware.RequestGate` gave this request."""
    return request.scope.get("kiln.request_id")


def describe_validation(errors: Sequence[Any]) -> str:
    """The first few pydantic/FastAPI validation errors as one line: ``loc: msg; loc: msg (+N more)``."""
    parts = []
    for e in list(errors)[:3]:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


async def _http_error(request: Request, exc: Exception) -> Response:
    exc = cast(StarletteHTTPException, exc)  # registered for this class only
    code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), request_id(request), exc.headers,
                          request.url.path)


async def _validation_error(request: Request, exc: Exception) -> Response:
    exc = cast(RequestValidationError, exc)
    return error_response(400, "invalid_request", describe_validation(exc.errors()), request_id(request),
                          path=request.url.path)


async def _kiln_error(request: Request, exc: Exception) -> Response:
    status, code, _ = lookup(exc)
    headers = None
    if isinstance(exc, QueueFull):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    message = str(exc)
    if isinstance(exc, ModelNotFound) and not request.scope.get("kiln.authorized", False):
        message = exc.short  # which models are served is for key holders only
    rid = getattr(exc, "request_id", None) or request_id(request)
    return error_response(status, code, message, rid, headers, request.url.path)


async def _unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientDisconnect):  # not an error of the server's: RequestGate records it as 499
        raise exc
    rid = request_id(request)
    log.error("request %s failed", rid, exc_info=exc)
    return error_response(500, "internal_error", f"internal error (request id {rid}); see the server log",
                          rid, path=request.url.path)


async def handle(request: Request, exc: Exception) -> Response:
    """The answer the installed handlers give for ``exc``, for a route served outside FastAPI
    (:class:`kiln.serve.v1.FastPredict`); a client that went away is re-raised for
    :class:`~kiln.serve.middleware.RequestGate` to record."""
    if isinstance(exc, StarletteHTTPException):
        return await _http_error(request, exc)
    if isinstance(exc, RequestValidationError):
        return await _validation_error(request, exc)
    if isinstance(exc, KilnError):
        return await _kiln_error(request, exc)
    return await _unexpected(request, exc)


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(KilnError, _kiln_error)
    app.add_exception_handler(Exception, _unexpected)


__all__ = ["ERRORS", "GRPC_FOR_HTTP", "OPENAPI_RESPONSES", "ApiError", "describe_validation",
           "error_response", "handle", "install", "is_kserve_v1", "is_v2", "lookup", "request_id"]
