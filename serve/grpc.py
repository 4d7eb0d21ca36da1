"""The KServe v2 / Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), as Triton
serves it, for ``kiln serve --grpc-port N``.

The same registry, batchers, statistics and API key as the REST API: this module only turns protobuf
messages into :class:`~kiln.serve.v2_tensors.InputTensor` and typed errors into status codes. Methods
it does not implement answer UNIMPLEMENTED. The servicer
base class and messages are tritonclient's (``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``),
so the service is the one Triton clients are generated from. The server runs on grpcio's asyncio
server in the app's event loop; the app lifespan starts it and stops it (finishing in-flight calls)
before the batchers drain.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from kiln import __version__
from kiln.errors import ConfigError, InputError, KilnError
from kiln.serve.errors import GRPC_FOR_HTTP, lookup
from kiln.serve.grpc_wire import split_infer_request
from kiln.serve.images import DecodePool
from kiln.serve.inference import Input, infer
from kiln.serve.registry import Registry, ServedModel
from kiln.serve.schemas import v2_datatype
from kiln.serve.settings import Settings
from kiln.serve.triton_ext import (
    EXTENSIONS,
    VERSION,
    Stats,
    config_message,
    index_message,
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

log = logging.getLogger("kiln.serve.grpc")

# The typed-contents field that carries each datatype when raw_input_contents is not used (FP16 has none).
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}

SERVICE = "inference.GRPCInferenceService"
# Requests of one ModelStreamInfer stream served at once; the stream reads no further until one finishes.
STREAM_IN_FLIGHT = 64

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def rpc(guarded: bool = True) -> Callable[[Handler], Handler]:
    """Check the API key (``guarded``), and answer a typed error with its status code; anything else is
    logged and answered INTERNAL without internals. Cancellation by the client passes through."""

    def wrap(method: Handler) -> Handler:
        @functools.wraps(method)
        async def call(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            if guarded:
                denied = self.denied(context)
                if denied is not None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)
            try:
                return await method(self, request, context)
            except KilnError as exc:
                code, message = grpc.StatusCode[lookup(exc)[2]], str(exc)
            except HTTPException as exc:  # raised by code shared with the REST API (image budget)
                code = grpc.StatusCode[GRPC_FOR_HTTP.get(exc.status_code, "INVALID_ARGUMENT")]
                message = str(exc.detail)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:
                log.exception("gRPC %s failed", method.__name__)
                code = grpc.StatusCode.INTERNAL
                message = f"internal error in {method.__name__}; see the server log"
            # Aborted outside the except block and without the request: the abort's traceback (and, inside
            # the block, the error it would carry as context) would keep every frame's locals, the request and
            # its tensors, alive in a reference cycle until a full collection, tens of MB per refused request.
            del request
            await context.abort(code, message)

        return call

    return wrap


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the app's registry, settings and statistics."""

    def __init__(self, state: State) -> None:
        self.registry: Registry = state.registry
        self.settings: Settings = state.settings
        self.stats: Stats = state.stats
        self.api_key: str | None = state.api_key
        self.decode_slots: DecodePool = state.decode_slots

    def denied(self, context: grpc.aio.ServicerContext) -> str | None:
        """Why the call's ``authorization: Bearer <key>`` metadata is refused, or None when it is fine."""
        if self.api_key is None:
            return None
        value = next((str(v) for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing API key: send metadata 'authorization: Bearer <key>'"
        if not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            return "wrong API key"
        return None

    def served(self, name: str, version: str) -> ServedModel:
        return versioned(self.registry, name, version)

    @rpc(guarded=False)
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    @rpc(guarded=False)
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.registry.not_ready_reason() is None)

    # Which models are served is for key holders only: per-model readiness needs the key, as over REST.
    @rpc()
    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.served(request.name, request.version).batcher.ready)

    @rpc()
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name="kiln", version=__version__, extensions=EXTENSIONS)

    @rpc()
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        md = model_metadata(self.served(request.name, request.version))
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=md.name, versions=md.versions, platform=md.platform,
            inputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in md.inputs],
            outputs=[meta(name=t.name, datatype=t.datatype, shape=t.shape) for t in md.outputs],
        )

    @rpc()
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return pb.ModelConfigResponse(config=config_message(self.served(request.name, request.version)))

    @rpc()
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        names = [
            self.served(request.name,
                        request.version).name] if request.name else [m.name for m in self.registry]
        return self.stats.message(names)

    @rpc()
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        return index_message(self.registry, request.ready)

    @rpc()
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return await self.infer(request)

    @rpc()
    async def ModelInferWire(self, request: bytes, context: Any) -> Any:
        """:meth:`ModelInfer` from the message's bytes (how :func:`start` registers it): the tensors'
        data is read in place, not copied (:mod:`kiln.serve.grpc_wire`)."""
        message, raw = split_infer_request(request)
        return await self.infer(message, raw)

    async def ModelStreamInfer(self, request_iterator: Any,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Triton's streaming inference (tritonclient's ``start_stream`` / ``async_stream_infer``): each
        request of the stream is served as :meth:`ModelInfer` serves it, with the same limits, up to
        :data:`STREAM_IN_FLIGHT` at once; each answer carries its request's id (answers come in the order
        they finish), an error as ``error_message`` while the stream goes on."""
        denied = self.denied(context)
        if denied is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)
        answers: asyncio.Queue[Any] = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()

        async def serve(request: Any) -> None:
            try:
                answers.put_nowait(pb.ModelStreamInferResponse(infer_response=await self.infer(request)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error is this request's answer
                answers.put_nowait(pb.ModelStreamInferResponse(
                    error_message=_stream_error(exc),
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id)))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(serve(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def infer(self, request: Any, raw: Sequence[bytes | memoryview] | None = None) -> Any:
        """One ``ModelInferRequest`` answered (typed errors raised, for the caller to answer); ``raw``:
        its ``raw_input_contents`` when they were split off the message."""
        model = self.served(request.model_name, request.model_version)
        out, letterboxes, wanted, _ = await infer(model, self._read(model, request, raw), request.id,
                                                  self.settings, self.decode_slots, self.stats)
        out = boxes_to_original(model, out, letterboxes)  # encoded images: boxes in their own pixels, as /v1
        response = pb.ModelInferResponse(model_name=model.name, model_version=VERSION, id=request.id)
        for k in wanted:
            arr = out[k]
            response.outputs.append(
                pb.ModelInferResponse.InferOutputTensor(name=k, datatype=v2_datatype(arr.dtype),
                                                        shape=list(arr.shape))
            )
            response.raw_output_contents.append(to_bytes(arr))
        return response

    async def _read(self, model: ServedModel, request: Any,
                    raw: Sequence[bytes | memoryview] | None) -> tuple[Input, list[str]]:
        """The model's input from the request's tensors, and the outputs it asks for."""
        check_inputs(model, [(t.name, t.datatype, [int(d) for d in t.shape]) for t in request.inputs],
                     self.settings.max_images_per_request)
        tensors = grpc_inputs(request, raw)
        wanted = output_names(model, [o.name for o in request.outputs] or None)
        for o in request.outputs:
            check_output_parameters(o.name, o.parameters)
        return model_input(tensors), wanted


def _stream_error(exc: Exception) -> str:
    if isinstance(exc, KilnError):
        return str(exc)
    if isinstance(exc, HTTPException):
        return str(exc.detail)
    log.error("gRPC ModelStreamInfer request failed", exc_info=exc)
    return "internal error in ModelStreamInfer; see the server log"


async def _unimplemented(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this method is not implemented by kiln's server")


# Every method of the service that kiln does not implement answers UNIMPLEMENTED with a status, not
# grpcio's default (NotImplementedError, logged as an error with a traceback per call).
for _name, _method in vars(service_pb2_grpc.GRPCInferenceServiceServicer).items():
    if callable(_method) and not _name.startswith("_") and _name not in vars(Servicer):
        setattr(Servicer, _name, _unimplemented)
del _name, _method


def grpc_inputs(request: Any, raw: Sequence[bytes | memoryview] | None = None) -> list[InputTensor]:
    """Each input from ``raw_input_contents`` (one entry per input, in order; ``raw`` when given) or its
    typed contents."""
    if raw is None:
        raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InputError(
            f"raw_input_contents holds {len(raw)} tensors | expected one per input ({len(request.inputs)})")
    tensors = []
    for i, t in enumerate(request.inputs):
        shape = [int(d) for d in t.shape]
        if raw:
            data = from_raw(t.name, t.datatype, shape, raw[i])
        elif t.datatype in _CONTENTS:
            # The repeated field, not a list of it: from_list counts its values before converting any.
            data = from_list(t.name, t.datatype, shape, getattr(t.contents, _CONTENTS[t.datatype]))
        else:
            raise InputError(f"Input tensor: {t.name} | datatype {t.datatype} in typed contents | "
                             f"expected raw_input_contents, or one of {', '.join(_CONTENTS)}")
        tensors.append(InputTensor(t.name, t.datatype, shape, data))
    return tensors


class _Handlers:
    """Receives the method handlers tritonclient's generated code would add to a server."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def _add_service(servicer: Servicer, server: grpc.aio.Server) -> None:
    """The service's handlers as the generated code makes them, except ModelInfer, which receives the
    message's bytes (:meth:`Servicer.ModelInferWire`)."""
    made = _Handlers()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, made)
    handlers = made.handlers
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInferWire, request_deserializer=None,
        response_serializer=pb.ModelInferResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def start(app: Any) -> grpc.aio.Server:
    """Listen on ``settings.grpc_port`` (0: a free port, kept in ``app.state.grpc_port``) and start
    serving."""
    settings: Settings = app.state.settings
    limit = settings.max_body_bytes
    # Above the body limit a call answers RESOURCE_EXHAUSTED. One server: without SO_REUSEPORT a port already
    # taken is an error at start instead of a second server sharing it silently (grpcio's default on Linux).
    # Workers of `kiln serve --workers N` (app.state.workers) share the port the parent holds for them.
    shared = getattr(app.state, "workers", None) is not None
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", int(shared))])
    _add_service(Servicer(app.state), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    except RuntimeError:
        port = 0
    if not port:
        raise ConfigError(f"cannot listen for gRPC on {host}:{settings.grpc_port}")
    await server.start()
    app.state.grpc_port = port
    log.info("serving gRPC (KServe v2) on %s:%d", host, port)
    return server


__all__ = ["STREAM_IN_FLIGHT", "Servicer", "grpc_inputs", "start"]
