"""Triton's ``ModelConfig`` for a bundle, shared by ``kiln export --triton-repo`` (written as
config.pbtxt) and ``kiln serve`` (answered by the model configuration extension over HTTP and gRPC).

Built as Triton's own protobuf (shipped in tritonclient), so it is valid by construction and both
consumers describe a model the same way. Each output's meaning (layout, coordinate space, whether
post-processing was applied) is stated in ``parameters`` under ``output.<name>.description``: Triton's
``ModelOutput`` has no description field, and ``parameters`` is the config's free-form map (backends
ignore keys they do not know). With ``label_filename`` set, the outputs whose last axis is the classes
name that file (one class name per line, class 0 first), which the model repository holds beside
config.pbtxt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.bundle import BatchRange, Bundle, TensorSpec
from kiln.errors import ExportError

_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
           "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "bool": "TYPE_BOOL"}


LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class TritonOptions:
    max_queue_delay_us: int = 1000
    instances: int = 1
    model_name: str | None = None
    label_filename: str | None = None  # a classes file beside config.pbtxt (a model repository writes one)
    # a detector's end-to-end graph (kiln export --nms): its outputs and the NMS settings inside it
    outputs: tuple[TensorSpec, ...] | None = None
    nms: dict[str, Any] | None = None


def model_config(bundle: Bundle, batch: BatchRange, *, platform: str, name: str,
                 options: TritonOptions) -> Any:
    """Triton's ``ModelConfig`` for the bundle (dims exclude the batch axis: ``max_batch_size`` > 0)."""
    from tritonclient.grpc import model_config_pb2 as pb

    man = bundle.manifest
    cfg = pb.ModelConfig(name=name, platform=platform, max_batch_size=batch.max)
    cfg.input.append(
        pb.ModelInput(name=man.input.name, data_type=_dtype(pb, man.input.dtype), dims=list(man.input.shape)))
    for out in options.outputs or man.outputs:
        output = pb.ModelOutput(name=out.name, data_type=_dtype(pb, out.dtype), dims=list(out.shape))
        if options.label_filename and out.name in _CLASS_OUTPUTS:
            output.label_filename = options.label_filename
        cfg.output.append(output)
        cfg.parameters[f"output.{out.name}.description"].string_value = describe_output(bundle, out.name)
    for key, value in (options.nms or {}).items():  # what the end-to-end graph's NMS does, as kiln.json says
        cfg.parameters[f"nms.{key}"].string_value = (str(value).lower() if isinstance(value, bool)
                                                     else str(value))
    preferred = sorted({batch.opt, batch.max})
    cfg.dynamic_batching.CopyFrom(
        pb.ModelDynamicBatching(preferred_batch_size=preferred,
                                max_queue_delay_microseconds=options.max_queue_delay_us)
    )
    kind = pb.ModelInstanceGroup.KIND_GPU if platform == "tensorrt_plan" else pb.ModelInstanceGroup.KIND_AUTO
    cfg.instance_group.append(pb.ModelInstanceGroup(count=options.instances, kind=kind))
    cfg.default_model_filename = "model.plan" if platform == "tensorrt_plan" else "model.onnx"
    return cfg


# Outputs whose last axis is the class: classification logits, per-class detection scores.
# det_classes holds class indices rather than scores: the file still names them for a reader.
_CLASS_OUTPUTS = frozenset({"logits", "scores", "det_classes"})


def describe_output(bundle: Bundle, name: str) -> str:
    """What output ``name`` holds, in one sentence: layout, coordinate space, post-processing done or not."""
    man = bundle.manifest
    n = len(man.classes)
    labels = f"class i is line i+1 of {LABELS_FILE}"
    if man.task == "classify" and name == "logits":
        return (f"[{n}] raw class scores (logits, before softmax) for the {n} classes; {labels}. "
                "kiln's top-k applies softmax to these")
    if man.task == "detect":
        w, h = man.preprocess.size
        post = man.detect_post()
        raw = (f"before NMS: keep scores >= {post.score_threshold}, then per-class NMS at IoU "
               f"{post.iou_threshold}, at most {post.max_detections} per image (kiln.json postprocess)")
        space = (f"in the letterboxed {w}x{h} input's pixels (undo the letterbox: subtract the padding, "
                 "divide by the scale, for original-image coordinates)")
        known = {
            "boxes": f"[anchors, 4] candidate boxes x1, y1, x2, y2 {space}, one per anchor, {raw}",
            "scores": f"[anchors, {n}] per-class sigmoid scores of each candidate box; {labels}; {raw}",
            "num_dets": "[1] int32 number of valid detections per image (NMS applied in the graph)",
            "det_boxes": f"[K, 4] detected boxes x1, y1, x2, y2 {space}, NMS applied; "
                         "rows past num_dets are padding",
            "det_scores": "[K] detection scores, NMS applied; rows past num_dets are padding",
            "det_classes": f"[K] int32 class index of each detection; {labels}; "
                           "rows past num_dets are padding",
        }
        if name in known:
            return known[name]
    return f"model output {name}; see kiln.json of the bundle"


def _dtype(pb: Any, dtype: str) -> int:
    if dtype not in _DTYPES:
        raise ExportError(f"Triton: tensor dtype {dtype} has no Triton type mapping")
    return int(pb.DataType.Value(_DTYPES[dtype]))


__all__ = ["LABELS_FILE", "TritonOptions", "describe_output", "model_config"]
