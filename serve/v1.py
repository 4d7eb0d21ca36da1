"""The native REST API: ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/models/{name}/predict``.

A predict request is read, decoded and preprocessed here (small images on the event loop, large ones
in the thread pool), submitted to the model's batcher and answered with :func:`kiln.outputs.predictions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from kiln import processing
from kiln.outputs import predictions
from kiln.processing import Letterbox
from kiln.serve.auth import AUTH
from kiln.serve.batcher import wait_result
from kiln.serve.errors import OPENAPI_RESPONSES, request_id
from kiln.serve.images import INLINE_PIXELS, decode_images, header_pixels, read_images
from kiln.serve.registry import Registry, ServedModel
from kiln.serve.schemas import ModelInfo, ModelList, PredictRequest, PredictResponse
from kiln.serve.settings import Settings

router = APIRouter(tags=["v1"], dependencies=AUTH, responses=OPENAPI_RESPONSES)

_PREDICT_BODY = {
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
}


@dataclass
class Prepared:
    x: np.ndarray  # [N, C, H, W] float32
    boxes: list[Letterbox]


def _prepare(blobs: list[bytes], model: ServedModel, max_pixels: int) -> Prepared:
    x, boxes = processing.preprocess(decode_images(blobs, max_pixels), model.manifest.preprocess)
    return Prepared(x, boxes)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    registry: Registry = request.app.state.registry
    return ModelList(models=[m.info() for m in registry])


@router.get("/v1/models/{name}", response_model=ModelInfo)
async def model_info(name: str, request: Request) -> ModelInfo:
    registry: Registry = request.app.state.registry
    return registry.get(name).info()


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    summary="top-k labels (classify) or boxes in original-image pixels (detect) for each image",
    openapi_extra=_PREDICT_BODY,
)
async def predict(
    name: str,
    request: Request,
    top_k: int | None = Query(None, ge=1, description="classification: labels per image"),
) -> Any:
    state = request.app.state
    registry: Registry = state.registry
    settings: Settings = state.settings
    model = registry.get(name)
    backend = model.check_ready()
    rid = request_id(request) or ""
    with model.batcher.announce():
        blobs, body_top_k = await read_images(request, settings.max_images_per_request)
        pixels = [header_pixels(b) for b in blobs]
        if all(p is not None and p <= INLINE_PIXELS for p in pixels):
            prep = _prepare(blobs, model, settings.max_image_pixels)
        else:
            prep = await run_in_threadpool(_prepare, blobs, model, settings.max_image_pixels)
        fut = model.submit({model.manifest.input.name: prep.x}, rid, settings.timeout_s)
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
        "request_id": rid,
        "predictions": results,
    }


__all__ = ["router"]
