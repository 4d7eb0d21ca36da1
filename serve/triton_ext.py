"""Triton's protocol extensions over the served models: model configuration, repository index and
inference statistics.

Each answer is built once as Triton's own protobuf message (tritonclient ships ``model_config_pb2``
and ``service_pb2``): gRPC returns it as is, REST as the JSON Triton writes (:func:`message_to_json`:
proto field names, every field present, 64-bit integers as numbers), so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kiln.bundle import BatchRange, TensorSpec
from kiln.serve.registry import ModelNotFound, Registry, ServedModel
from kiln.serve.schemas import MetadataTensor, ModelMetadata, v2_datatype
from kiln.triton_config import TritonOptions, describe_output, model_config

VERSION = "1"  # a bundle is one model version; metadata advertises it and versioned routes accept it
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxrt": "onnxruntime_onnx", "torch": "pytorch_libtorch"}

# Extensions this server implements, as named in server metadata (REST and gRPC).
EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "statistics"]


class VersionNotFound(ModelNotFound):
    """A request named a version the model does not have (404 / NOT_FOUND, like an unknown model)."""


def versioned(registry: Registry, name: str, version: str | None) -> ServedModel:
    """The model ``name`` of a request that may name a version (None or "": any)."""
    model = registry.get(name)
    if version and version != VERSION:
        raise VersionNotFound(f"model '{name}' has no version '{version}'; available: {VERSION}")
    return model


def platform(model: ServedModel) -> str:
    b = model.batcher.backend
    return PLATFORMS.get(b.name, b.name) if b is not None else "loading"


# Where a detector's boxes are, as this server answers them (kiln.json's description is the graph's own).
BOX_COORDINATES = ("x1, y1, x2, y2 in the model input's (letterboxed) pixels for a tensor input; in each "
                   "original image's pixels for encoded images (BYTES input), as /v1 answers: raw boxes "
                   "unclipped (clip to the image after NMS), det_boxes clipped")


def served_outputs(model: ServedModel) -> list[TensorSpec]:
    """The outputs of the graph being served (an end-to-end detector's num_dets, det_boxes, ...), or
    kiln.json's before it is loaded."""
    b = model.batcher.backend
    return list(b.outputs) if b is not None else list(model.manifest.outputs)


def model_metadata(model: ServedModel) -> ModelMetadata:
    """The protocol's model metadata (name, versions, platform, input and the served graph's output tensors
    with a dynamic batch axis), and kiln's parameters (task, labels, backend, precision, what each output
    holds, and for a detector where its boxes are and the NMS inside an end-to-end graph); REST answers all
    of it, gRPC the tensors and names (its metadata has no parameters: the model configuration holds the
    same descriptions)."""
    m = model.manifest
    b = model.batcher.backend
    outputs = served_outputs(model)
    params: dict[str, Any] = {"task": m.task, "labels": m.classes, "backend": b.name if b else None,
                              "precision": b.precision if b else None,
                              "outputs": {o.name: describe_output(model.bundle, o.name) for o in outputs}}
    if m.task == "detect":
        params["box_coordinates"] = BOX_COORDINATES
        nms = _served_nms(model)
        baked = ", ".join(f"{k}={nms[k]}" for k in _NMS_KEYS if k in nms) if nms else ""
        params["postprocessing"] = (
            f"NMS done in the graph ({baked})"
            if nms else "none: threshold the scores, then per-class NMS (kiln.json postprocess)")
    return ModelMetadata(
        name=model.name,
        versions=[VERSION],
        platform=platform(model),
        inputs=[
            MetadataTensor(name=m.input.name, datatype=v2_datatype(m.input.dtype),
                           shape=[-1, *m.input.shape])],
        outputs=[
            MetadataTensor(name=o.name, datatype=v2_datatype(o.dtype),
                           shape=[-1, *o.shape]) for o in outputs],
        parameters=params,
    )


_NMS_KEYS = ("score_threshold", "iou_threshold", "max_detections", "class_agnostic")


def _served_nms(model: ServedModel) -> dict[str, Any] | None:
    """The NMS settings inside the served graph (an end-to-end detector's artifact), or None."""
    art = model.manifest.artifacts.get(getattr(model.batcher.backend, "artifact", None) or "")
    return art.nms.model_dump() if art is not None and art.nms is not None else None


def config_message(model: ServedModel) -> Any:
    """Triton's ``ModelConfig`` for a served model: the one ``kiln export --triton-repo`` writes, with
    the batch limit and platform of the backend that is serving it."""
    batch = model.manifest.input.batch
    if model.batcher.backend is not None:
        top = model.batcher.max_items
        batch = BatchRange(min=min(batch.min, top), opt=min(batch.opt, top), max=top)
    options = TritonOptions(max_queue_delay_us=round(model.batcher.max_delay * 1e6))
    if nms := _served_nms(model):  # an end-to-end detector graph
        options = dataclasses.replace(options, outputs=tuple(served_outputs(model)), nms=nms)
    plat = platform(model)
    return model_config(model.bundle, batch, platform=plat if plat != "loading" else "onnxruntime_onnx",
                        name=model.name, options=options)


def index_message(registry: Registry, ready_only: bool = False) -> Any:
    from tritonclient.grpc import service_pb2 as pb

    out = pb.RepositoryIndexResponse()
    for m in registry:
        if m.batcher.load_error is not None:
            state, reason = "UNAVAILABLE", str(m.batcher.load_error)
        elif m.batcher.ready:
            state, reason = "READY", ""
        else:
            state, reason = "LOADING" if m.batcher.backend is None else "UNAVAILABLE", ""
        if ready_only and state != "READY":
            continue
        out.models.append(
            pb.RepositoryIndexResponse.ModelIndex(name=m.name, version=VERSION, state=state, reason=reason))
    return out


def message_to_json(message: Any) -> dict[str, Any]:
    """A protobuf message as Triton's REST API writes it: proto field names, defaults included, and
    64-bit integers as JSON numbers (``json_format`` writes them as strings)."""
    from google.protobuf import json_format

    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return _int64_as_numbers(message.DESCRIPTOR, data)


_INT64 = {"int64", "uint64", "sint64", "fixed64", "sfixed64"}


def _int64_as_numbers(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    for f in descriptor.fields:
        if f.name not in data:
            continue
        value = data[f.name]
        if f.message_type is not None:
            if f.message_type.GetOptions().map_entry:
                vf = f.message_type.fields_by_name["value"]
                if vf.message_type is not None:
                    data[f.name] = {k: _int64_as_numbers(vf.message_type, v) for k, v in value.items()}
            elif isinstance(value, list):
                data[f.name] = [_int64_as_numbers(f.message_type, v) for v in value]
            elif isinstance(value, dict):
                data[f.name] = _int64_as_numbers(f.message_type, value)
        elif _type_name(f) in _INT64:
            data[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


def _type_name(f: Any) -> str:
    from google.protobuf.descriptor import FieldDescriptor

    names = {FieldDescriptor.TYPE_INT64: "int64", FieldDescriptor.TYPE_UINT64: "uint64",
             FieldDescriptor.TYPE_SINT64: "sint64", FieldDescriptor.TYPE_FIXED64: "fixed64",
             FieldDescriptor.TYPE_SFIXED64: "sfixed64"}
    return names.get(f.type, "")


# ---- statistics --------------------------------------------------------------------------------------


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class _Stages:
    """compute_input, compute_infer and compute_output of one batch size (or of every request)."""

    input: _Duration = field(default_factory=_Duration)
    infer: _Duration = field(default_factory=_Duration)
    output: _Duration = field(default_factory=_Duration)

    def add(self, input_s: float, infer_s: float, output_s: float, count: int) -> None:
        self.input.add(input_s, count)
        self.infer.add(infer_s, count)
        self.output.add(output_s, count)


@dataclass
class ModelStats:
    """One model's counters. Requests (success, fail) are counted by the protocol handlers; queue time
    and the three compute stages per batch size come from the batcher's own measurements
    (``Batcher.on_run``): compute_input gathers the requests' inputs into one batch (concatenation,
    padding), compute_infer is the backend call, compute_output hands each request its rows."""

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute: _Stages = field(default_factory=_Stages)
    batches: dict[int, _Stages] = field(default_factory=dict)
    inference_count: int = 0
    last_inference_ms: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_run(self, items: int, seconds: float, waits: list[float], input_s: float = 0.0,
                   output_s: float = 0.0) -> None:
        with self.lock:
            # Per request, as Triton counts them: each request of the batch spent the batch's stage times.
            self.compute.add(input_s, seconds, output_s, len(waits))
            for w in waits:
                self.queue.add(max(0.0, w))
            self.batches.setdefault(items, _Stages()).add(input_s, seconds, output_s, 1)
            self.inference_count += items
            self.last_inference_ms = int(time.time() * 1000)

    def record_request(self, ok: bool, seconds: float) -> None:
        with self.lock:
            (self.success if ok else self.fail).add(seconds)

    def message(self, name: str) -> Any:
        from tritonclient.grpc import service_pb2 as pb

        def dur(d: _Duration) -> Any:
            return pb.StatisticDuration(count=d.count, ns=d.ns)

        with self.lock:
            zero = pb.StatisticDuration()  # no response cache: present, as Triton answers them, and zero
            c = self.compute
            stats = pb.InferStatistics(success=dur(self.success), fail=dur(self.fail), queue=dur(self.queue),
                                       compute_input=dur(c.input), compute_infer=dur(c.infer),
                                       compute_output=dur(c.output), cache_hit=zero, cache_miss=zero)
            batches = [pb.InferBatchStatistics(batch_size=n, compute_input=dur(d.input),
                                               compute_infer=dur(d.infer),
                                               compute_output=dur(d.output))
                       for n, d in sorted(self.batches.items())]
            return pb.ModelStatistics(
                name=name, version=VERSION, last_inference=self.last_inference_ms,
                inference_count=self.inference_count,
                execution_count=sum(d.infer.count for d in self.batches.values()),
                inference_stats=stats, batch_stats=batches,
            )


class Stats:
    """Statistics for every served model; :meth:`watch` hooks each batcher."""

    def __init__(self, registry: Registry) -> None:
        self.models = {m.name: ModelStats() for m in registry}
        for m in registry:
            m.batcher.on_run = self.models[m.name].record_run

    @contextlib.contextmanager
    def request(self, name: str) -> Iterator[None]:
        """Count one inference request of a served model as a success, or a failure if it raises."""
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.models[name].record_request(False, time.perf_counter() - t0)
            raise
        self.models[name].record_request(True, time.perf_counter() - t0)

    def message(self, names: list[str]) -> Any:
        from tritonclient.grpc import service_pb2 as pb

        return pb.ModelStatisticsResponse(model_stats=[self.models[n].message(n) for n in names])


__all__ = ["BOX_COORDINATES", "EXTENSIONS", "PLATFORMS", "VERSION", "ModelStats", "Stats", "VersionNotFound",
           "config_message", "index_message",
           "message_to_json", "model_metadata", "platform", "served_outputs",
           "versioned"]
