"""A Triton Inference Server model repository for a bundle: ``DIR/<model>/config.pbtxt`` + ``1/``.

The config is built as Triton's own ``ModelConfig`` protobuf (shipped in tritonclient) and printed
with ``google.protobuf.text_format``, so it is valid by construction. The ONNX graph is always
copied (``1/model.onnx``); where a TensorRT engine of the same precision was built it is copied as
``1/model.plan`` and the config selects the ``tensorrt_plan`` platform (delete that line pair to fall
back to ONNX Runtime in Triton).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.bundle import BatchRange, Bundle
from kiln.errors import ExportError
from kiln.fsutil import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

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


def triton_name(bundle: Bundle) -> str:
    """Triton model names become URL path segments: keep them to [A-Za-z0-9_.-]."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", bundle.name) or "model"


def write_triton_repo(
    bundle: Bundle,
    repo: str | os.PathLike[str],
    *,
    onnx_file: str,
    engine_file: str | None,
    batch: BatchRange,
    options: TritonOptions | None = None,
) -> Path:
    """Write ``repo/<model>/`` and return the model folder. Other models in ``repo`` are left alone."""
    from google.protobuf import text_format

    options = options or TritonOptions()
    if engine_file and batch.min > 1:
        # Triton may send any batch from 1 to max_batch_size; a plan whose profile starts higher rejects it.
        raise ExportError(f"--triton-repo with --engine needs a batch range starting at 1 (got --batch {batch}): "
                          "Triton's dynamic batcher sends batches from 1 up to max_batch_size")
    name = options.model_name or triton_name(bundle)
    folder = Path(repo) / name
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    with atomic_path(version / "model.onnx") as tmp:
        shutil.copyfile(bundle.path(onnx_file), tmp)
    platform = "onnxruntime_onnx"
    if engine_file:
        with atomic_path(version / "model.plan") as tmp:
            shutil.copyfile(bundle.path(engine_file), tmp)
        platform = "tensorrt_plan"
    cfg = model_config(bundle, batch, platform=platform, name=name, options=options)
    atomic_write_text(folder / "config.pbtxt", text_format.MessageToString(cfg))
    log.info("Triton model repository: %s (%s)", folder, platform)
    return folder


def read_config(path: str | os.PathLike[str]) -> Any:
    """Parse a config.pbtxt back into ``ModelConfig`` (raises ``text_format.ParseError`` if invalid)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
