"""The KServe v2 / Open Inference Protocol REST API (JSON tensors): server and model metadata, health,
and ``POST /v2/models/{name}/infer``. Readiness answers 400 when not ready, as the protocol says.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from kiln import __version__
from kiln.errors import InputError
from kiln.serve.auth import AUTH
from kiln.serve.batcher import ModelNotReady, wait_result
from kiln.serve.errors import OPENAPI_RESPONSES, error_response, request_id
from kiln.serve.registry import Registry, ServedModel
from kiln.serve.schemas import (
    V2_DTYPES,
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ModelMetadata,
    ResponseOutput,
    ServerMetadata,
    v2_datatype,
)
from kiln.serve.settings import Settings

router = APIRouter(tags=["v2"], responses=OPENAPI_RESPONSES)

_TRITON_PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxrt": "onnxruntime_onnx", "torch": "pytorch_torch"}


@router.get("/v2", response_model=ServerMetadata, dependencies=AUTH)
async def v2_server() -> ServerMetadata:
    return ServerMetadata(name="kiln", version=__version__, extensions=[])


@router.get("/v2/health/live", tags=["health"])
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", tags=["health"], summary="200 when every model is ready, 400 otherwise")
async def v2_ready(request: Request) -> Any:
    reason = request.app.state.registry.not_ready_reason()
    if reason is not None:
        return error_response(400, "not_ready", reason, request_id(request))
    return {"ready": True}


@router.get("/v2/models/{name}", response_model=ModelMetadata, dependencies=AUTH)
async def v2_model(name: str, request: Request) -> ModelMetadata:
    model = request.app.state.registry.get(name)
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


@router.get("/v2/models/{name}/ready", tags=["health"])
async def v2_model_ready(name: str, request: Request) -> Any:
    model = request.app.state.registry.get(name)
    if not model.batcher.ready:
        try:
            model.check_ready()
        except ModelNotReady as exc:
            return error_response(400, "not_ready", str(exc), request_id(request))
        return error_response(400, "not_ready", f"model '{name}' is shutting down", request_id(request))
    return {"name": name, "ready": True}


@router.post("/v2/models/{name}/infer", response_model=InferenceResponse, dependencies=AUTH,
             response_model_exclude_none=True)
async def v2_infer(name: str, body: InferenceRequest, request: Request) -> InferenceResponse:
    state = request.app.state
    registry: Registry = state.registry
    settings: Settings = state.settings
    model = registry.get(name)
    model.check_ready()
    feeds = _feeds(model, body, settings.max_images_per_request)
    wanted = _outputs(model, body)
    fut = model.submit(feeds, request_id(request) or "", settings.timeout_s)
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


def _feeds(model: ServedModel, body: InferenceRequest, max_items: int) -> dict[str, np.ndarray]:
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


def _outputs(model: ServedModel, body: InferenceRequest) -> list[str]:
    """The output names the request asked for (all of them when it names none)."""
    names = [o.name for o in model.manifest.outputs]
    if not body.outputs:
        return names
    wanted = [o.name for o in body.outputs]
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise InputError(f"Output tensor: {unknown[0]} | unknown | expected one of {names}")
    return wanted


__all__ = ["router"]
