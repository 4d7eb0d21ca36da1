"""Triton's ``ModelConfig`` for a bundle, shared by ``kiln export --triton-repo`` (written as
config.pbtxt) and ``kiln serve`` (answered by the model configuration extension over HTTP and gRPC).

Built as Triton's own protobuf (shipped in tritonclient), so it is valid by construction and both
consumers describe a model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.bundle import BatchRange, Bundle
from kiln.errors import ExportError

_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
           "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "bool": "TYPE_BOOL"}


@dataclass(frozen=True)
class TritonOptions:
    max_queue_delay_us: int = 1000
    instances: int = 1
    model_name: str | None = None


def model_config(bundle: Bundle, batch: BatchRange, *, platform: str, name: str, options: TritonOptions) -> Any:
    """Triton's ``ModelConfig`` for the bundle (dims exclude the batch axis: ``max_batch_size`` > 0)."""
    from tritonclient.grpc import model_config_pb2 as pb

    man = bundle.manifest
    cfg = pb.ModelConfig(name=name, platform=platform, max_batch_size=batch.max)
    cfg.input.append(pb.ModelInput(name=man.input.name, data_type=_dtype(pb, man.input.dtype), dims=list(man.input.shape)))
    for out in man.outputs:
        cfg.output.append(pb.ModelOutput(name=out.name, data_type=_dtype(pb, out.dtype), dims=list(out.shape)))
    preferred = sorted({batch.opt, batch.max})
    cfg.dynamic_batching.CopyFrom(
        pb.ModelDynamicBatching(preferred_batch_size=preferred, max_queue_delay_microseconds=options.max_queue_delay_us)
    )
    kind = pb.ModelInstanceGroup.KIND_GPU if platform == "tensorrt_plan" else pb.ModelInstanceGroup.KIND_AUTO
    cfg.instance_group.append(pb.ModelInstanceGroup(count=options.instances, kind=kind))
    cfg.default_model_filename = "model.plan" if platform == "tensorrt_plan" else "model.onnx"
    return cfg


def _dtype(pb: Any, dtype: str) -> int:
    if dtype not in _DTYPES:
        raise ExportError(f"Triton: tensor dtype {dtype} has no Triton type mapping")
    return int(pb.DataType.Value(_DTYPES[dtype]))


__all__ = ["TritonOptions", "model_config"]
