"""The KServe v2 / Open Inference Protocol REST API, as Triton serves it: server and model metadata,
health, ``POST /v2/models/{name}/infer`` with JSON tensors and the binary tensor data extension, and
Triton's model configuration, repository index and statistics extensions.

Every model route also answers under ``/versions/{version}`` (a bundle is version "1"). Bodies are
read whatever their Content-Type says (tritonclient sends none), and errors on these routes are the
protocol's ``{"error": "<message>"}`` (:func:`kiln.serve.errors.error_response`). Readiness answers
400 when not ready, as the protocol says.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from kiln import __version__
from kiln.errors import InputError
from kiln.serve.auth import AUTH
from kiln.serve.batcher import ModelNotReady
from kiln.serve.errors import ApiError, describe_validation, error_response, request_id
from kiln.serve.inference import Input, infer
from kiln.serve.registry import Registry, ServedModel
from kiln.serve.schemas import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    RepositoryIndexRequest,
    ServerMetadata,
    V2Error,
    v2_datatype,
)
from kiln.serve.settings import Settings
from kiln.serve.triton_ext import (
    EXTENSIONS,
    VERSION,
    Stats,
    VersionNotFound,
    config_message,
    index_message,
    message_to_json,
    model_metadata,
    versioned,
)
from kiln.serve.v2_tensors import (
    InputTensor,
    boxes_to_original,
    check_inputs,
    check_output_parameters,
    from_list,
    from_raw,
    model_input,
    output_names,
    to_bytes,
)

V2_RESPONSES: dict[int | str,
                   dict[str, Any]] = {
                       "default": {"model": V2Error, "description": 'error: {"error": "<message>"}'}}
router = APIRouter(tags=["v2"], responses=V2_RESPONSES)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined, to sit in an operation's ``openapi_extra``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
                  "description": f'model version; a bundle is version "{VERSION}"'}


def _route(path: str, methods: list[str], endpoint: Callable[..., Any], **kw: Any) -> None:
    """Register ``path`` and its ``/versions/{version}`` twin (the model path is the first 3 segments)."""
    router.add_api_route(path, endpoint, methods=methods, **kw)
    head, tail = path[: path.index("{name}") + 6], path[path.index("{name}") + 6 :]
    extra = dict(kw.pop("openapi_extra", None) or {})
    extra["parameters"] = [*extra.get("parameters", []), _VERSION_PARAM]
    router.add_api_route(f"{head}/versions/{{version}}{tail}", endpoint, methods=methods, openapi_extra=extra,
                         **kw)


def served(request: Request, name: str) -> ServedModel:
    """The model a route names, checking the version of a versioned route."""
    return versioned(request.app.state.registry, name, request.path_params.get("version"))


# ---- server ----------------------------------------------------------------------------------------


@router.get("/v2", response_model=ServerMetadata)
async def v2_server() -> ServerMetadata:
    return ServerMetadata(name="kiln", version=__version__, extensions=EXTENSIONS)


@router.get("/v2/health/live", tags=["health"])
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", tags=["health"], summary="200 when every model is ready, 400 otherwise")
async def v2_ready(request: Request) -> Any:
    reason = request.app.state.registry.not_ready_reason(names=request.scope.get("kiln.authorized", True))
    if reason is not None:
        return error_response(400, "not_ready", reason, request_id(request), path=request.url.path)
    return {"ready": True}


@router.post("/v2/repository/index", dependencies=AUTH, response_model=list[dict[str, Any]],
             summary="Triton's model repository extension: every served model and its state",
             openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": inline_schema(RepositoryIndexRequest)}}}})
async def v2_repository_index(request: Request) -> Any:
    body = await request.body()
    limits = JsonLimits(request.app.state.settings.max_json_depth, _JSON_SLACK)
    query = parse_json(RepositoryIndexRequest, body, limits) if body.strip() else RepositoryIndexRequest()
    return message_to_json(index_message(request.app.state.registry, bool(query.ready))).get("models", [])


@router.get("/v2/models/stats", dependencies=AUTH, response_model=dict[str, Any],
            summary="Triton's statistics extension, for every served model")
async def v2_all_stats(request: Request) -> Any:
    registry: Registry = request.app.state.registry
    stats: Stats = request.app.state.stats
    return message_to_json(stats.message([m.name for m in registry]))


# ---- models ----------------------------------------------------------------------------------------


async def v2_model(name: str, request: Request) -> ModelMetadata:
    return model_metadata(served(request, name))


async def v2_model_ready(name: str, request: Request) -> Any:
    model = served(request, name)
    if not model.batcher.ready:
        try:
            model.check_ready()
        except ModelNotReady as exc:
            return error_response(400, "not_ready", str(exc), request_id(request), path=request.url.path)
        return error_response(400, "not_ready", f"model '{name}' is shutting down", request_id(request),
                              path=request.url.path)
    return {"name": name, "ready": True}


async def v2_model_config(name: str, request: Request) -> Any:
    return message_to_json(config_message(served(request, name)))


async def v2_model_stats(name: str, request: Request) -> Any:
    served(request, name)
    stats: Stats = request.app.state.stats
    return message_to_json(stats.message([name]))


async def v2_infer(name: str, request: Request) -> Response:
    state = request.app.state
    model = served(request, name)
    out, letterboxes, (req, wanted, as_binary), _ = await infer(
        model, _read(model, request, state), request_id(request) or "", state.settings, state.decode_slots,
        state.stats,
        request.is_disconnected)
    out = boxes_to_original(model, out, letterboxes)  # encoded images: boxes in their own pixels, as /v1
    return infer_response(name, req.id, {k: out[k] for k in wanted}, as_binary)


async def _read(model: ServedModel, request: Request,
                state: Any) -> tuple[Input, tuple[InferenceRequest, list[str], dict[str, bool]]]:
    """The model's input from the JSON request and its binary data, and the outputs it asks for."""
    settings: Settings = state.settings
    body = await request.body()
    header_length = request.headers.get(_HEADER_LENGTH)
    if len(body) > INLINE_BYTES:  # parsing takes the event loop's time: do it beside it
        async with state.decode_slots:
            req, tensors = await asyncio.to_thread(read_infer, model, body, header_length, settings)
    else:
        req, tensors = read_infer(model, body, header_length, settings)
    del body
    wanted, as_binary = requested_outputs(model, req)
    return model_input(tensors), (req, wanted, as_binary)


# One body schema (the JSON request): a body offered as two media types makes client generators emit
# modules that do not import. The binary data extension sends the same JSON, its length in the header,
# followed by the inputs' bytes; a generated client sends plain JSON.
_HEADER_LENGTH = "Inference-Header-Content-Length"
_INFER_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "description": (
        f"the JSON request; with the binary data extension, {_HEADER_LENGTH} bytes of it, then each input's "
        "bytes (inputs with parameters.binary_data_size), sent as application/octet-stream"), "content": {
        "application/json": {"schema": inline_schema(InferenceRequest)}}},
    "parameters": [{"name": _HEADER_LENGTH, "in": "header", "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                    "description": "binary data extension: the length of the JSON request at the start of "
                                   "the body"}],
}
_BINARY_ANSWER: dict[int | str, dict[str, Any]] = {200: {"description": (
    f"the JSON response; with binary outputs, {_HEADER_LENGTH} bytes of it, then each output's bytes "
    "(application/octet-stream)"), "headers": {_HEADER_LENGTH: {
        "description": "with binary outputs: the length of the JSON response at the start of the body",
        "schema": {"type": "integer"}}}}}

_route("/v2/models/{name}", ["GET"], v2_model, response_model=ModelMetadata)
_route("/v2/models/{name}/ready", ["GET"], v2_model_ready, tags=["health"],
       summary="200 when the model is ready, 400 otherwise")
_route("/v2/models/{name}/config", ["GET"], v2_model_config, dependencies=AUTH, response_model=dict[str, Any],
       summary="Triton's model configuration extension (ModelConfig as JSON)")
_route("/v2/models/{name}/stats", ["GET"], v2_model_stats, dependencies=AUTH, response_model=dict[str, Any],
       summary="Triton's statistics extension: requests, queue and compute time "
               "(ns), executions per batch size")
_route("/v2/models/{name}/infer", ["POST"], v2_infer, dependencies=AUTH, response_model=InferenceResponse,
       response_model_exclude_none=True, openapi_extra=_INFER_BODY, responses=_BINARY_ANSWER)


# ---- the inference request and response --------------------------------------------------------------


# Bodies up to this size are parsed on the event loop (well under a millisecond); larger ones in a thread.
INLINE_BYTES = 64 * 1024
# Separators a JSON request may hold beyond its tensors' values: names, shapes, parameters, outputs.
_JSON_SLACK = 4096


@dataclass(frozen=True)
class JsonLimits:
    """What a JSON body may hold, checked before it becomes Python objects: ``depth`` levels of
    nesting, and ``items`` values (array elements and object members, counted by their separators)."""

    depth: int
    items: int


def infer_limits(model: ServedModel, settings: Settings) -> JsonLimits:
    """The limits of an inference request to ``model``: as many values as its largest batch of its input
    shape holds (``max_images_per_request`` items), plus room for the request's other fields."""
    per_item = max(math.prod(model.manifest.input.shape), 1)
    return JsonLimits(settings.max_json_depth, settings.max_images_per_request * per_item + _JSON_SLACK)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def load_json(text: bytes, limits: JsonLimits) -> Any:
    """``text`` parsed as JSON within ``limits``.

    Before parsing, the separators are counted (a C-speed scan): a document with more of them than
    ``limits.items`` is refused without building any of its values. After parsing, one walk checks the
    nesting depth (the parser itself stops at the interpreter's recursion limit, answered the same way).
    """
    separators = text.count(b",")
    if separators > limits.items:
        raise ApiError(400, "invalid_request",
                       f"the JSON request holds more than {limits.items} values, more "
                       "than any request to this model needs (send large tensors as binary data)")
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "invalid_request",
                       f"the JSON request is nested more than {limits.depth} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_request", f"the request is not valid JSON: {exc}") from None
    check_depth(raw, limits.depth)
    return raw


def check_depth(value: Any, limit: int) -> None:
    """Refuse a parsed JSON value nested more than ``limit`` levels deep (arrays and objects), without
    recursion: each container is visited once, so the walk is as cheap as the document is small."""
    stack = [(value, 1)] if isinstance(value, (list, dict)) else []
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        nested = [c for c in children if isinstance(c, (list, dict))]
        if nested:
            if depth >= limit:
                raise ApiError(400, "invalid_request",
                               f"the JSON request is nested more than {limit} levels deep")
            stack.extend((c, depth + 1) for c in nested)


def parse_json(model: type[Any], text: bytes | memoryview, limits: JsonLimits) -> Any:
    raw = load_json(bytes(text), limits)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ApiError(400, "invalid_request", describe_validation(exc.errors())) from None


def parse_infer(body: bytes, header_length: str | None,
                limits: JsonLimits) -> tuple[InferenceRequest, memoryview]:
    """The JSON request and the binary data after it (binary data extension)."""
    if header_length is None:
        return parse_json(InferenceRequest, body, limits), memoryview(b"")
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()):
        raise InputError(
            f"Inference-Header-Content-Length: '{header_length[:40]}' | expected a non-negative integer")
    n = int(text)
    if n > len(body):
        raise InputError(f"Inference-Header-Content-Length: {n} | past the end of the {len(body)}-byte body")
    view = memoryview(body)
    return parse_json(InferenceRequest, view[:n], limits), view[n:]


def read_infer(model: ServedModel, body: bytes, header_length: str | None,
               settings: Settings) -> tuple[InferenceRequest, list[InputTensor]]:
    """The request and its input tensors, each limit checked before the work it bounds: the JSON's size
    and depth before parsing, names, datatypes and shapes before any tensor data is read, and each
    tensor's element count before its values are converted."""
    req, binary = parse_infer(body, header_length, infer_limits(model, settings))
    check_inputs(model, [(t.name, t.datatype, t.shape) for t in req.inputs], settings.max_images_per_request)
    return req, http_inputs(req, binary)


def http_inputs(req: InferenceRequest, binary: memoryview) -> list[InputTensor]:
    """Each input from its JSON ``data`` or its ``binary_data_size`` bytes of the binary part, in order."""
    tensors, pos = [], 0
    for t in req.inputs:
        size = t.parameters.binary_data_size if t.parameters is not None else None
        if size is not None:
            if t.data is not None:
                raise InputError(
                    f"Input tensor: {t.name} | has both data and binary_data_size | expected one")
            if pos + size > len(binary):
                raise InputError(f"Input tensor: {t.name} | binary_data_size {size} | only "
                                 f"{len(binary) - pos} bytes "
                                 "of binary data follow (is Inference-Header-Content-Length set?)")
            data = from_raw(t.name, t.datatype, t.shape, binary[pos : pos + size])
            pos += size
        elif t.data is None:
            raise InputError(
                f"Input tensor: {t.name} | no data | expected data or a binary_data_size parameter")
        else:
            data = from_list(t.name, t.datatype, t.shape, t.data)
        tensors.append(InputTensor(t.name, t.datatype, list(t.shape), data))
    if pos != len(binary):
        raise InputError(
            f"{len(binary) - pos} bytes of binary data follow the JSON that no input's binary_data_size "
            "claims")
    return tensors


def requested_outputs(model: ServedModel, req: InferenceRequest) -> tuple[list[str], dict[str, bool]]:
    """The outputs to answer and, for each, whether as binary data."""
    wanted = output_names(model, [o.name for o in req.outputs] if req.outputs else None)
    default = bool(req.parameters is not None and req.parameters.binary_data_output)
    binary = dict.fromkeys(wanted, default)
    for o in req.outputs or []:
        params = o.parameters.model_dump(exclude_none=True) if o.parameters is not None else {}
        check_output_parameters(o.name, params)
        if "binary_data" in params:
            binary[o.name] = params["binary_data"]
    return wanted, binary


def infer_response(name: str, rid: str | None, out: dict[str, Any], as_binary: dict[str, bool]) -> Response:
    outputs, chunks = [], []
    for k, arr in out.items():
        entry: dict[str, Any] = {"name": k, "datatype": v2_datatype(arr.dtype), "shape": list(arr.shape)}
        if as_binary[k]:
            raw = to_bytes(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if rid is not None:
        body["id"] = rid
    if not chunks:
        return JSONResponse(body)
    header = json.dumps(body, separators=(",", ":")).encode()
    return Response(b"".join([header, *chunks]), media_type="application/octet-stream",
                    headers={_HEADER_LENGTH: str(len(header))})


__all__ = ["INLINE_BYTES", "V2_RESPONSES", "JsonLimits", "VersionNotFound", "check_depth", "infer_limits",
           "inline_schema", "load_json", "parse_json",
           "read_infer", "router", "served"]
