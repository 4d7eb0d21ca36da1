"""The HTTP server: ``create_app(models, settings)`` returns a FastAPI app serving one or more bundles.

Handlers stay thin (decode -> submit -> await -> encode); each model's backend lives in its own
:class:`~kiln.serve.batcher.Batcher` worker thread. Routes:

- native: ``POST /v1/models/{name}/predict`` (multipart ``file`` fields or JSON base64),
  ``GET /v1/models``, ``GET /v1/models/{name}``
- KServe v2 / Open Inference Protocol: ``/v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{name}``, ``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``
- ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), ``/docs`` (OpenAPI), ``/`` (a page to try an image)

Every error is ``{"error": {"code": ..., "message": ..., "request_id": ...}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import importlib.resources
import io
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, Info, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln import __version__, processing
from kiln.bundle import Bundle, Manifest
from kiln.errors import ConfigError, InputError, KilnError
from kiln.predict import predictions
from kiln.processing import ImageDecodeError, Letterbox
from kiln.runtime.base import Backend
from kiln.serve.batcher import (
    Batcher,
    BatcherClosed,
    ClientDisconnected,
    InferenceFailed,
    ModelNotReady,
    QueueFull,
    RequestTimeout,
    wait_result,
)
from kiln.serve.schemas import (
    V2_DTYPES,
    BatchInfo,
    ErrorResponse,
    Health,
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ModelInfo,
    ModelList,
    ModelMetadata,
    PredictRequest,
    PredictResponse,
    ResponseOutput,
    ServerMetadata,
    TensorInfo,
    v2_datatype,
)
from kiln.serve.settings import Settings

log = logging.getLogger("kiln.serve")

Loader = Callable[[Bundle, Settings], Backend]
LoadErrorHook = Callable[[str, BaseException], None]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Images up to this many pixels are decoded on the event loop: a thread hop costs more than decoding
# a small image. Anything larger (up to the pixel limit) is decoded in the thread pool.
_INLINE_PIXELS = 512 * 512
_TRITON_PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxrt": "onnxruntime_onnx", "torch": "pytorch_torch"}


class ApiError(StarletteHTTPException):
    """An HTTP error with a machine-readable code; passes through FastAPI's body parsing untouched."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


# ---- metrics ---------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in their own registry (one per app, so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "kiln_request_duration_seconds",
            "HTTP request latency by model, route and status",
            ["model", "route", "status"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            "items per inference batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.inference = Histogram(
            "kiln_inference_duration_seconds",
            "backend time per batch",
            ["model"],
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.queue_depth = Gauge("kiln_queue_depth", "requests waiting per model", ["model"], registry=self.registry)
        self.backend = Info("kiln_backend", "the runtime serving each model", ["model"], registry=self.registry)

    def watch(self, model: ServedModel) -> None:
        self.queue_depth.labels(model.name).set_function(model.batcher.qsize)
        batch, infer = self.batch_size.labels(model.name), self.inference.labels(model.name)

        def on_batch(items: int, seconds: float) -> None:
            batch.observe(items)
            infer.observe(seconds)

        model.batcher.on_batch = on_batch

    def loaded(self, model: ServedModel) -> None:
        b = model.batcher.backend
        if b is not None:
            self.backend.labels(model.name).info(
                {"backend": b.name, "precision": b.precision, "device": b.device, "max_batch": str(model.batcher.max_items)}
            )


# ---- models ----------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    name: str
    bundle: Bundle
    batcher: Batcher

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    def check_ready(self) -> Backend:
        backend = self.batcher.backend
        if self.batcher.load_error is not None:
            raise ModelNotReady(f"model '{self.name}' failed to load: {self.batcher.load_error}")
        if backend is None:
            raise ModelNotReady(f"model '{self.name}' is still loading")
        return backend

    def info(self) -> ModelInfo:
        m = self.manifest
        b = self.batcher.backend
        return ModelInfo(
            name=self.name,
            task=m.task,
            labels=m.classes,
            ready=self.batcher.ready,
            backend=b.name if b else None,
            precision=b.precision if b else None,
            device=b.device if b else None,
            batch=BatchInfo(min=b.min_batch if b else m.input.batch.min, max=self.batcher.max_items if b else m.input.batch.max),
            input=TensorInfo(name=m.input.name, shape=m.input.shape, dtype=m.input.dtype),
            outputs=[TensorInfo(name=o.name, shape=o.shape, dtype=o.dtype) for o in m.outputs],
            preprocess=m.preprocess.model_dump(mode="json"),
            postprocess=m.postprocess,
            error=str(self.batcher.load_error) if self.batcher.load_error is not None else None,
        )


def default_loader(bundle: Bundle, settings: Settings) -> Backend:
    from kiln.runtime import load

    return load(bundle, backend=settings.backend, precision=settings.precision)


# ---- request gate: request id, body limit, latency metric -------------------------------------------


class _Gate:
    """Pure ASGI middleware (no per-request task): request id, body size limit, latency histogram."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, models: dict[str, ServedModel]) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        scope["kiln.request_id"] = rid
        status = [500]
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                too_big = _error_response(413, "body_too_large", self._too_large(length.decode("latin-1")), rid)
                await too_big(scope, receive, send_with_id)
                return
            seen = [0]

            async def limited_receive() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    seen[0] += len(message.get("body", b""))
                    if seen[0] > self.limit:
                        raise ApiError(413, "body_too_large", self._too_large(f"more than {self.limit}"))
                return message

            await self.app(scope, limited_receive, send_with_id)
        finally:
            route = scope.get("route")
            name = scope.get("path_params", {}).get("name", "")
            self.metrics.latency.labels(
                name if name in self.models else "", getattr(route, "path", "unmatched"), str(status[0])
            ).observe(time.perf_counter() - t0)

    def _too_large(self, size: str) -> str:
        return f"request body of {size} bytes is over the limit of {self.limit} bytes"


# ---- errors ----------------------------------------------------------------------------------------

_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "body_too_large", 415: "unsupported_media_type", 500: "internal_error", 503: "unavailable"}

# Most specific first: the first isinstance match decides the answer.
_KILN_ERRORS: list[tuple[type[BaseException], int, str]] = [
    (ImageDecodeError, 400, "invalid_image"),
    (InputError, 400, "invalid_input"),
    (QueueFull, 503, "queue_full"),
    (BatcherClosed, 503, "shutting_down"),
    (ModelNotReady, 503, "not_ready"),
    (RequestTimeout, 504, "timeout"),
    (InferenceFailed, 500, "inference_failed"),
    (ClientDisconnected, 499, "client_closed_request"),
    (ConfigError, 400, "invalid_request"),
]


def _error_response(
    status: int, code: str, message: str, request_id: str | None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return JSONResponse(body, status_code=status, headers=headers)


def _rid(request: Request) -> str | None:
    return request.scope.get("kiln.request_id")


def _install_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: Exception) -> Response:
        exc = cast(StarletteHTTPException, exc)  # registered for this class only
        code = getattr(exc, "code", None) or _STATUS_CODES.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, code, str(exc.detail), _rid(request), exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        exc = cast(RequestValidationError, exc)
        return _error_response(400, "invalid_request", _describe_validation(exc.errors()), _rid(request))

    async def kiln_error(request: Request, exc: Exception) -> Response:
        status, code = next(((s, c) for cls, s, c in _KILN_ERRORS if isinstance(exc, cls)), (400, "invalid_request"))
        headers = None
        if isinstance(exc, QueueFull):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        rid = getattr(exc, "request_id", None) or _rid(request)
        return _error_response(status, code, str(exc), rid, headers)

    async def unexpected(request: Request, exc: Exception) -> Response:
        rid = _rid(request)
        log.error("request %s failed", rid, exc_info=exc)
        return _error_response(500, "internal_error", f"internal error (request id {rid}); see the server log", rid)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(KilnError, kiln_error)
    app.add_exception_handler(Exception, unexpected)


def _describe_validation(errors: Sequence[Any]) -> str:
    parts = []
    for e in list(errors)[:3]:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more


# ---- images ----------------------------------------------------------------------------------------


@dataclass
class Prepared:
    x: np.ndarray  # [N, C, H, W] float32
    boxes: list[Letterbox]


def _header_pixels(blob: bytes) -> int | None:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            return img.width * img.height
    except Exception:
        return None  # decode_image will say what is wrong


def _prepare(blobs: list[bytes], model: ServedModel, max_pixels: int) -> Prepared:
    images = []
    for i, blob in enumerate(blobs):
        try:
            images.append(processing.decode_image(blob, max_pixels))
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"image {i}: {exc}" if len(blobs) > 1 else str(exc)) from None
    x, boxes = processing.preprocess(images, model.manifest.preprocess)
    return Prepared(x, boxes)


async def _read_images(request: Request, settings: Settings) -> tuple[list[bytes], int | None]:
    """The image files of a predict request and an optional top_k from the JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = settings.max_images_per_request
    top_k = None
    if ctype == "multipart/form-data":
        form = await request.form(max_files=limit + 1, max_fields=limit + 8)
        try:
            files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if len(files) != len(form.getlist("file")):
                raise ApiError(400, "invalid_request", "the `file` fields must be file uploads, not text")
            _check_count(len(files), limit)
            blobs = [await f.read() for f in files]
        finally:
            await form.close()
    elif ctype == "application/json":
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise ApiError(400, "invalid_request", _describe_validation(exc.errors())) from None
        _check_count(len(body.images), limit)
        blobs = [_b64(s, i) for i, s in enumerate(body.images)]
        top_k = body.top_k
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type '{ctype or 'none'}': send multipart/form-data with `file` fields, "
            'or application/json {"images": ["<base64>", ...]}',
        )
    return blobs, top_k


def _check_count(n: int, limit: int) -> None:
    if n == 0:
        raise ApiError(400, "no_images", 'no images: send one or more multipart `file` fields or JSON {"images": [...]}')
    if n > limit:
        raise ApiError(400, "too_many_images", f"{n} images in one request, over the limit of {limit}")


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:"):  # a data URL, as a browser's FileReader produces
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"images[{index}] is not valid base64") from None


# ---- the app -----------------------------------------------------------------------------------------


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
    load = loader or default_loader
    if not models:
        raise ConfigError("no models to serve: give at least one bundle")
    served: dict[str, ServedModel] = {}
    for name, source in models:
        if not _NAME.match(name):
            raise ConfigError(f"model name '{name}' must be letters, digits, '.', '_' or '-' (max 128)")
        if name in served:
            raise ConfigError(f"model name '{name}' is given twice: use --name to tell the bundles apart")
        bundle = source if isinstance(source, Bundle) else Bundle.load(source)

        def factory(bundle: Bundle = bundle) -> Backend:
            return load(bundle, settings)

        batcher = Batcher(
            factory,
            name=name,
            max_batch=settings.max_batch,
            max_delay=settings.max_delay,
            max_queue=settings.max_queue,
            warmup=settings.warmup,
        )
        served[name] = ServedModel(name, bundle, batcher)

    metrics = Metrics()
    for m in served.values():
        metrics.watch(m)
    state = {"stopping": False}

    async def watch_loads() -> None:
        for m in served.values():
            await asyncio.to_thread(m.batcher.wait_ready)
            if m.batcher.load_error is not None:
                if on_load_error is not None:
                    on_load_error(m.name, m.batcher.load_error)
            else:
                metrics.loaded(m)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for m in served.values():
            m.batcher.start()
        watcher = asyncio.create_task(watch_loads())
        try:
            yield
        finally:
            state["stopping"] = True
            watcher.cancel()
            # Uvicorn has finished in-flight requests by now; drain whatever is still queued.
            for m in served.values():
                await asyncio.to_thread(m.batcher.close, True, settings.timeout_s)

    app = FastAPI(
        title="kiln",
        version=__version__,
        description="Image classification and detection served from kiln bundles.",
        lifespan=lifespan,
        responses={"default": {"model": ErrorResponse, "description": "error"}},
    )
    app.state.models = served
    app.state.settings = settings
    app.state.metrics = metrics
    _install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(_Gate, limit=settings.max_body_bytes, metrics=metrics, models=served)

    api_key = settings.api_key_value()

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'",
                           {"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "unauthorized", "wrong API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})

    auth = [Depends(require_key)]

    def get_model(name: str) -> ServedModel:
        m = served.get(name)
        if m is None:
            raise ApiError(404, "model_not_found", f"unknown model '{name}'; served: {', '.join(sorted(served))}")
        return m

    def not_ready_reason() -> str | None:
        if state["stopping"]:
            return "shutting down"
        loading = [n for n, m in served.items() if m.batcher.backend is None and m.batcher.load_error is None]
        failed = [f"{n} ({m.batcher.load_error})" for n, m in served.items() if m.batcher.load_error is not None]
        if failed:
            return "failed to load: " + "; ".join(failed)
        if loading:
            return "loading: " + ", ".join(loading)
        return None

    def submit(model: ServedModel, request: Request, feeds: dict[str, np.ndarray]) -> Future[dict[str, np.ndarray]]:
        return model.batcher.submit(feeds, request_id=_rid(request) or "", timeout=settings.timeout_s)

    # -- page, health, metrics --

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = importlib.resources.files("kiln.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.get("/healthz", response_model=Health, tags=["health"], summary="liveness: the process answers")
    async def healthz() -> Health:
        return Health(status="stopping" if state["stopping"] else "ok")

    @app.get("/readyz", response_model=Health, tags=["health"],
             summary="readiness: every model loaded and warmed up (503 otherwise)")
    async def readyz(request: Request) -> Any:
        reason = not_ready_reason()
        if reason is not None:
            return _error_response(503, "not_ready", reason, _rid(request))
        return Health(status="ok", models={n: "ready" for n in served})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", dependencies=auth)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- native API --

    @app.get("/v1/models", response_model=ModelList, tags=["v1"], dependencies=auth)
    async def list_models() -> ModelList:
        return ModelList(models=[m.info() for m in served.values()])

    @app.get("/v1/models/{name}", response_model=ModelInfo, tags=["v1"], dependencies=auth)
    async def model_info(name: str) -> ModelInfo:
        return get_model(name).info()

    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        tags=["v1"],
        dependencies=auth,
        summary="top-k labels (classify) or boxes in original-image pixels (detect) for each image",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                            "required": ["file"],
                        }
                    },
                    "application/json": {"schema": PredictRequest.model_json_schema()},
                },
            }
        },
    )
    async def predict(
        name: str,
        request: Request,
        top_k: int | None = Query(None, ge=1, description="classification: labels per image"),
    ) -> Any:
        model = get_model(name)
        backend = model.check_ready()
        with model.batcher.announce():
            blobs, body_top_k = await _read_images(request, settings)
            pixels = [_header_pixels(b) for b in blobs]
            if all(p is not None and p <= _INLINE_PIXELS for p in pixels):
                prep = _prepare(blobs, model, settings.max_image_pixels)
            else:
                prep = await run_in_threadpool(_prepare, blobs, model, settings.max_image_pixels)
            fut = submit(model, request, {model.manifest.input.name: prep.x})
        out = await wait_result(fut, settings.timeout_s, request.is_disconnected)
        k = top_k or body_top_k or settings.top_k
        if model.manifest.task == "classify":
            results = predictions(model.manifest, out, prep.boxes, k)
        else:  # NMS over many boxes: keep it off the event loop
            results = await run_in_threadpool(predictions, model.manifest, out, prep.boxes, k)
        return {
            "model": name,
            "task": model.manifest.task,
            "backend": backend.name,
            "precision": backend.precision,
            "request_id": _rid(request) or "",
            "predictions": results,
        }

    # -- KServe v2 / Open Inference Protocol --

    @app.get("/v2", response_model=ServerMetadata, tags=["v2"], dependencies=auth)
    async def v2_server() -> ServerMetadata:
        return ServerMetadata(name="kiln", version=__version__, extensions=[])

    @app.get("/v2/health/live", tags=["v2", "health"])
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["v2", "health"], summary="200 when every model is ready, 400 otherwise")
    async def v2_ready(request: Request) -> Any:
        reason = not_ready_reason()
        if reason is not None:
            return _error_response(400, "not_ready", reason, _rid(request))
        return {"ready": True}

    @app.get("/v2/models/{name}", response_model=ModelMetadata, tags=["v2"], dependencies=auth)
    async def v2_model(name: str) -> ModelMetadata:
        model = get_model(name)
        m = model.manifest
        b = model.batcher.backend
        return ModelMetadata(
            name=name,
            versions=["1"],
            platform=_TRITON_PLATFORMS.get(b.name, b.name) if b else "loading",
            inputs=[MetadataTensor(name=m.input.name, datatype=v2_datatype(m.input.dtype), shape=[-1, *m.input.shape])],
            outputs=[MetadataTensor(name=o.name, datatype=v2_datatype(o.dtype), shape=[-1, *o.shape]) for o in m.outputs],
            parameters={"task": m.task, "labels": m.classes, "backend": b.name if b else None,
                        "precision": b.precision if b else None},
        )

    @app.get("/v2/models/{name}/ready", tags=["v2", "health"])
    async def v2_model_ready(name: str, request: Request) -> Any:
        model = get_model(name)
        if not model.batcher.ready:
            try:
                model.check_ready()
            except ModelNotReady as exc:
                return _error_response(400, "not_ready", str(exc), _rid(request))
            return _error_response(400, "not_ready", f"model '{name}' is shutting down", _rid(request))
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer", response_model=InferenceResponse, tags=["v2"], dependencies=auth,
              response_model_exclude_none=True)
    async def v2_infer(name: str, body: InferenceRequest, request: Request) -> InferenceResponse:
        model = get_model(name)
        model.check_ready()
        feeds = _v2_feeds(model, body, settings.max_images_per_request)
        wanted = _v2_outputs(model, body)
        fut = submit(model, request, feeds)
        out = await wait_result(fut, settings.timeout_s, request.is_disconnected)
        return InferenceResponse(
            model_name=name,
            model_version="1",
            id=body.id,
            outputs=[
                ResponseOutput(name=k, shape=list(out[k].shape), datatype=v2_datatype(out[k].dtype),
                               data=out[k].ravel().tolist())
                for k in wanted
            ],
        )

    return app


def _v2_feeds(model: ServedModel, body: InferenceRequest, max_items: int) -> dict[str, np.ndarray]:
    """Check each JSON tensor against the model input; errors name the tensor, what came and what was expected."""
    spec = model.manifest.input
    expected = (-1, *spec.shape)
    names = [t.name for t in body.inputs]
    if spec.name not in names or len(names) != 1:
        unknown = [n for n in names if n != spec.name]
        raise InputError(
            f"Input tensor: {unknown[0] if unknown else spec.name} | received inputs {names} | "
            f"expected exactly one input named '{spec.name}'"
        )
    t = body.inputs[0]
    want_type = v2_datatype(spec.dtype)
    if t.datatype.upper() != want_type:
        raise InputError(f"Input tensor: {t.name} | received datatype {t.datatype} | expected {want_type}")
    if len(t.shape) != len(expected) or tuple(t.shape[1:]) != tuple(spec.shape) or t.shape[0] < 1:
        raise InputError(
            f"Input tensor: {t.name} | received shape {t.shape} | expected a shape compatible with {list(expected)}"
        )
    if t.shape[0] > max_items:
        raise InputError(f"Input tensor: {t.name} | received batch {t.shape[0]} | expected at most {max_items} items")
    try:
        arr = np.asarray(t.data, dtype=np.dtype(V2_DTYPES[want_type]))
    except (ValueError, TypeError) as exc:
        raise InputError(f"Input tensor: {t.name} | data is not a regular array of {want_type} ({exc})") from None
    count = math.prod(t.shape)
    if arr.size != count:
        raise InputError(f"Input tensor: {t.name} | received {arr.size} values | expected {count} for shape {t.shape}")
    return {t.name: arr.reshape(t.shape)}


def _v2_outputs(model: ServedModel, body: InferenceRequest) -> list[str]:
    names = [o.name for o in model.manifest.outputs]
    if not body.outputs:
        return names
    wanted = [o.name for o in body.outputs]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise InputError(f"Output tensor: {unknown[0]} | unknown | expected one of {names}")
    return wanted


__all__ = ["ApiError", "Metrics", "ServedModel", "create_app", "default_loader"]

