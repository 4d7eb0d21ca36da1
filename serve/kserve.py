"""The KServe V1 (TensorFlow Serving style) protocol: ``POST /v1/models/{name}:predict``.

``{"instances": [...]}`` in, ``{"predictions": [...]}`` out, beside kiln's native ``/v1`` routes (whose
``GET /v1/models/{name}`` already answers V1's readiness: ``{"name": ..., "ready": ...}``). Each instance
is either one image's input tensor as nested lists in the model's input shape (already preprocessed), or
an encoded image file as ``{"b64": "<base64>"}`` (also ``{"image_bytes": {"b64": ...}}`` or the model's
input name in place of ``image_bytes``, TF Serving's named-input form). One request holds one kind.

Each prediction is what ``/v1/models/{name}/predict`` answers per image (:func:`kiln.outputs.predictions`):
top-k labels, or boxes in the original image's pixels (in the input tensor's pixels for tensor
instances). The request runs through :func:`kiln.serve.inference.infer` with the same limits, API key and
metrics as every route; errors are KServe's ``{"error": "<message>"}``
(:func:`kiln.serve.errors.error_response`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from kiln.errors import InputError
from kiln.outputs import predictions
from kiln.processing import Letterbox
from kiln.serve.errors import request_id
from kiln.serve.inference import Input, infer
from kiln.serve.registry import ServedModel
from kiln.serve.schemas import V1PredictRequest, V1PredictResponse, V2Error, v2_datatype
from kiln.serve.settings import Settings
from kiln.serve.v1 import json_response
from kiln.serve.v2 import INLINE_BYTES, JsonLimits, infer_limits, inline_schema, parse_json
from kiln.serve.v2_tensors import from_list

router = APIRouter(tags=["kserve-v1"],
                   responses={"default": {"model": V2Error, "description": 'error: {"error": "<message>"}'}})

PATH = "/v1/models/{name}:predict"
# The key of TF Serving's named-input form for an encoded image, beside the model's own input name.
IMAGE_KEY = "image_bytes"


@router.post(PATH, response_model=V1PredictResponse,
             summary="KServe V1: instances (input tensors or {\"b64\": encoded image}) in, predictions out",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": inline_schema(V1PredictRequest)}}}})
async def kserve_predict(name: str, request: Request) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    model = state.registry.get(name)
    out, letterboxes, shapes, _ = await infer(model, _read(model, request, settings),
                                              request_id(request) or "",
                                              settings, state.decode_slots,
                                              disconnected=request.is_disconnected)
    if letterboxes is None:  # tensors: boxes stay in the input tensor's pixels
        letterboxes = [Letterbox(1.0, 1.0, 0.0, 0.0, w, h) for w, h in shapes]
    if model.manifest.task == "classify":
        results = predictions(model.manifest, out, letterboxes, settings.top_k)
    else:  # NMS over many boxes: keep it off the event loop
        results = await run_in_threadpool(predictions, model.manifest, out, letterboxes)
    return json_response({"predictions": results})


async def _read(model: ServedModel, request: Request,
                settings: Settings) -> tuple[Input, list[tuple[int, int]]]:
    """The instances as encoded images or as the input tensor, and each tensor instance's width and height."""
    body = await request.body()
    limits = infer_limits(model, settings)
    if len(body) > INLINE_BYTES:  # parsing and converting take the event loop's time: do it beside it
        async with request.app.state.decode_slots:
            return await asyncio.to_thread(read_instances, model, body, limits,
                                           settings.max_images_per_request)
    return read_instances(model, body, limits, settings.max_images_per_request)


def read_instances(model: ServedModel, body: bytes, limits: JsonLimits,
                   max_items: int) -> tuple[Input, list[tuple[int, int]]]:
    """The JSON body parsed within ``limits`` and its instances read (:func:`instances_input`)."""
    return instances_input(model, parse_json(V1PredictRequest, body, limits).instances, max_items)


def instances_input(model: ServedModel, instances: list[Any],
                    max_items: int) -> tuple[Input, list[tuple[int, int]]]:
    """``instances`` as the model's input: encoded images (all ``{"b64": ...}``) or a float32 tensor
    ``[N, *input shape]`` (all nested lists). Raises :class:`~kiln.errors.InputError` naming the instance."""
    if len(instances) > max_items:
        raise InputError(f"instances: received {len(instances)} | expected at most {max_items} per request")
    images = [_b64(model, item, i) for i, item in enumerate(instances) if isinstance(item, dict)]
    if images and len(images) != len(instances):
        raise InputError("instances: a mix of encoded images and tensors | expected one kind per request")
    if images:
        return images, []
    spec = model.manifest.input
    dims: list[int] = []
    node: Any = instances  # the nesting along the first element of each level: its shape, if regular
    while isinstance(node, list):
        dims.append(len(node))
        node = node[0] if node else None
    if dims[1:] != list(spec.shape):
        raise InputError(f"instances: received shape {dims[1:]} per instance | expected {spec.shape} (the "
                         f"input '{spec.name}', preprocessed), or {{\"b64\": \"<encoded image>\"}}")
    # Values checked as strictly as v2's JSON tensors (no null, NaN, booleans or strings; no ragged nesting).
    shape = [len(instances), *spec.shape]
    x = from_list(spec.name, v2_datatype(spec.dtype), shape, instances).reshape(shape)
    w, h = (spec.shape[-1], spec.shape[-2]) if spec.layout == "NCHW" else (spec.shape[-2], spec.shape[-3])
    return x, [(w, h)] * len(x)


def _b64(model: ServedModel, item: dict[str, Any], index: int) -> bytes:
    """One ``{"b64": ...}`` instance (or ``{"image_bytes" | <input name>: {"b64": ...}}``) decoded."""
    keys = {IMAGE_KEY, model.manifest.input.name}
    if len(item) == 1 and next(iter(item)) in keys and isinstance(inner := next(iter(item.values())), dict):
        item = inner
    if set(item) != {"b64"} or not isinstance(item["b64"], str):
        raise InputError(f'instances[{index}]: an object with keys {sorted(item)} | expected {{"b64": '
                         f'"<encoded image>"}} (or {{"{IMAGE_KEY}": {{"b64": ...}}}})')
    try:
        return base64.b64decode(item["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"instances[{index}].b64 is not valid base64") from None


__all__ = ["PATH", "instances_input", "read_instances", "router"]
