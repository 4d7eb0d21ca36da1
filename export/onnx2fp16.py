"""onnx2fp16: an fp32 ONNX graph to a float16 one with fp32 inputs and outputs kept.

The converter is onnxruntime's ``onnxruntime.transformers.float16`` (maintained with onnxruntime; a
fork of onnxconverter-common's). onnxconverter-common 1.16 writes an invalid graph around ``Resize``
(the upsampling in kiln-det-s's FPN: "Type (tensor(float)) of output arg ... does not match expected
type (tensor(float16))"); onnxruntime's version does not. Ops the converter blocks by default stay in
fp32 behind Casts. Keeping I/O in fp32 means clients, preprocessing and the batcher stay unchanged.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kiln.calib.onnxfile import load_onnx
from kiln.errors import ExportError

log = logging.getLogger(__name__)


def onnx2fp16(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the float16 version of ``onnx_path`` to ``out_path``; return the converter's settings."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = load_onnx(onnx_path)
    try:
        half = convert_float_to_float16(model, keep_io_types=True)
        # The converter appends the input Casts at the end of the node list; onnx.checker (and
        # TensorRT's parser) want topological order.
        sorter = OnnxModel(half)
        sorter.topological_sort()
        half = sorter.model
    except Exception as exc:  # the converter raises plain exceptions for unsupported graphs
        raise ExportError(f"onnx2fp16: cannot convert {onnx_path}: {type(exc).__name__}: {exc}") from exc
    try:
        onnx.checker.check_model(half)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"onnx2fp16: the float16 graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    onnx.save(half, str(out_path))
    try:  # type errors the checker misses surface when ONNX Runtime loads the graph
        ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(
            f"onnx2fp16: ONNX Runtime rejects the float16 graph: {str(exc).splitlines()[0]}") from None
    return {"converter": f"onnxruntime.transformers.float16 (onnxruntime {ort.__version__})",
            "keep_io_types": True}
