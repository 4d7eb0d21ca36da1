"""The native REST API: ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/models/{name}/predict``.

A predict request's images and controls are read here (multipart or JSON), run through
:func:`kiln.serve.inference.infer` (decoding within the budget, the model's batcher) and answered with
:func:`kiln.outputs.predictions`.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from kiln.bundle import DetectPost
from kiln.outputs import predictions
from kiln.processing import DetectControlError, detect_overrides
from kiln.serve import errors
from kiln.serve.errors import OPENAPI_RESPONSES, ApiError, request_id
from kiln.serve.images import read_images
from kiln.serve.inference import infer
from kiln.serve.registry import Registry, ServedModel
from kiln.serve.schemas import DetectControls, ModelInfo, ModelList, PredictRequest, PredictResponse
from kiln.serve.settings import Settings

# The API key is checked by RequestGate before a route is matched (kiln.serve.auth).
router = APIRouter(tags=["v1"], responses=OPENAPI_RESPONSES)

_PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                }
            },
            "application/json": {"schema": PredictRequest.model_json_schema()},
        },
    }
}


def json_response(content: Any) -> Response:
    """A 200 JSON answer serialised by orjson. The hot routes return this instead of a model FastAPI
    would validate and encode again; their schemas stay in the OpenAPI description via ``responses``."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


class PredictQuery(BaseModel):
    """The predict route's query parameters, validated here rather than by FastAPI's per-parameter
    dependency injection, which cost more per request than the whole LeNet-5 inference."""

    model_config = ConfigDict(extra="ignore")

    top_k: int | None = Field(None, ge=1, description="classification: labels per image")
    conf: float | None = Field(None, ge=0, le=1,
                               description="detection: score threshold (default: kiln.json)")
    iou: float | None = Field(None, ge=0, le=1, description="detection: NMS IoU threshold")
    max_det: int | None = Field(None, ge=1, description="detection: boxes kept per image")
    agnostic: bool | None = Field(None, description="detection: NMS across classes")
    multi_label: bool | None = Field(None, description="detection: a box once per class over the threshold")
    classes: str | None = Field(
        None, description="detection: keep only these classes (comma-separated labels or indices)"
    )


_NO_QUERY = PredictQuery()


def _query(request: Request) -> PredictQuery:
    if not request.scope.get("query_string"):
        return _NO_QUERY
    try:
        return PredictQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:  # the same 400 FastAPI's own query validation gives
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()]) from None


def _query_parameters() -> list[dict[str, Any]]:
    schema = PredictQuery.model_json_schema()
    return [{"name": name, "in": "query", "required": False, "description": prop.pop("description", ""),
             "schema": prop} for name, prop in schema["properties"].items()]


_PREDICT_BODY["parameters"] = _query_parameters()


@router.get("/v1/models", response_model=None,
            responses={200: {"model": ModelList, "description": "served models"}})
async def list_models(request: Request) -> Response:
    registry: Registry = request.app.state.registry
    return json_response(ModelList(models=[m.info() for m in registry]).model_dump(mode="json"))


@router.get("/v1/models/{name}", response_model=None,
            responses={200: {"model": ModelInfo, "description": "one model"}})
async def model_info(name: str, request: Request) -> Response:
    registry: Registry = request.app.state.registry
    return json_response(registry.get(name).info().model_dump(mode="json"))


@router.post(
    "/v1/models/{name}/predict",
    response_model=None,
    responses={200: {"model": PredictResponse, "description": "predictions"}},
    summary="top-k labels (classify) or boxes in original-image pixels (detect) for each image",
    openapi_extra=_PREDICT_BODY,
)
async def predict(name: str, request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    model = state.registry.get(name)
    rid = request_id(request) or ""
    out, boxes, (k, detect), backend = await infer(model, _read(model, request, settings), rid, settings,
                                                   state.decode_slots, disconnected=request.is_disconnected)
    if model.manifest.task == "classify":
        results = predictions(model.manifest, out, boxes, k)
    else:  # NMS over many boxes: keep it off the event loop
        results = await run_in_threadpool(predictions, model.manifest, out, boxes, k, detect)
    return json_response({
        "model": name,
        "task": model.manifest.task,
        "backend": backend.name,
        "precision": backend.precision,
        "request_id": rid,
        "predictions": results,
    })


async def _read(model: ServedModel, request: Request,
                settings: Settings) -> tuple[list[bytes], tuple[int, DetectPost | None]]:
    """The request's encoded images, and its top-k and detection controls (checked before any decoding)."""
    q = _query(request)
    blobs, body = await read_images(request, settings.max_images_per_request)
    body_top_k = body.top_k if body is not None else None
    detect = None
    # Detection controls can only come from the query or a JSON body; a classify request that names
    # none (a plain upload, or JSON with only images and top_k) skips them.
    if q is not _NO_QUERY or model.manifest.task == "detect" or (
            body is not None and not body.model_fields_set <= {"images", "top_k"}):
        query = DetectControls(conf=q.conf, iou=q.iou, max_det=q.max_det, agnostic=q.agnostic,
                               multi_label=q.multi_label,
                               classes=q.classes.split(",") if q.classes is not None else None)
        detect = _detect_controls(body, model.manifest, query, q.top_k or body_top_k)
    return blobs, (q.top_k or body_top_k or settings.top_k, detect)


class FastPredict:
    """``POST /v1/models/{name}/predict`` served straight from :class:`~kiln.serve.middleware.RequestGate`.

    The same :func:`predict` the FastAPI route runs, without the layers FastAPI and Starlette put around a
    route (exception middleware, exit stack, routing, endpoint wrappers): on a small model they cost more
    than the inference. Errors get the answers :func:`kiln.serve.errors.install` gives; the route stays
    registered for the OpenAPI description.
    """

    PATH = re.compile(r"/v1/models/([^/]+)/predict")  # fullmatch: "$" would also match before a final newline

    def __init__(self, app: Any) -> None:
        self.app = app
        self._route: Any = None

    def match(self, scope: Scope) -> ASGIApp | None:
        if scope["method"] != "POST":
            return None
        m = self.PATH.fullmatch(scope["path"])
        if m is None:
            return None
        if self._route is None:
            self._route = next(r for r in self.app.router.routes
                               if getattr(r, "path", "") == "/v1/models/{name}/predict")
        scope["app"] = self.app
        scope["route"] = self._route
        scope["path_params"] = {"name": m.group(1)}
        return self._serve

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            response = await predict(scope["path_params"]["name"], request)
        except Exception as exc:  # noqa: BLE001 - handle() re-raises what it does not answer
            response = await errors.handle(request, exc)
        await response(scope, receive, send)


def _detect_controls(body: PredictRequest | None, manifest: Any, query: DetectControls,
                     top_k: int | None) -> DetectPost | None:
    """kiln.json's detection controls overridden by the JSON body's, then by the query's; checked before
    the request reaches the batcher. Detection controls on a classifier and top_k on a detector are
    400s, not silently ignored."""
    controls = body.model_dump(exclude_none=True, exclude={"images", "top_k"}) if body is not None else {}
    given = {**controls, **query.model_dump(exclude_none=True)}
    if manifest.task != "detect":
        if given:
            raise ApiError(400, "invalid_request",
                           f"{next(iter(given))} applies to detection models; this one classifies "
                           "(use top_k)")
        return None
    if top_k is not None:
        raise ApiError(400, "invalid_request",
                       "top_k applies to classification; use max_det to limit the boxes per image")
    try:
        return detect_overrides(manifest.detect_post(), manifest.classes, conf=given.get("conf"),
                                iou=given.get("iou"),
                                max_det=given.get("max_det"), agnostic=given.get("agnostic"),
                                multi_label=given.get("multi_label"), only=given.get("classes"))
    except DetectControlError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None


__all__ = ["FastPredict", "router"]
