"""onnx2fp16: an fp32 ONNX graph to a float16 one with fp32 inputs and outputs kept.

onnxconverter-common's converter is the maintained one (onnxmltools and onnxruntime's transformer
tools both call it). Keeping I/O in fp32 means clients, preprocessing and the batcher stay unchanged;
the graph casts at its edges.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kiln.errors import ExportError

log = logging.getLogger(__name__)


def onnx2fp16(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the float16 version of ``onnx_path`` to ``out_path``; return the converter's settings."""
    import onnx
    from onnxconverter_common import __version__ as occ_version
    from onnxconverter_common import float16

    model = onnx.load(str(onnx_path))
    try:
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # the converter raises plain exceptions for unsupported graphs
        raise ExportError(f"onnx2fp16: cannot convert {onnx_path}: {type(exc).__name__}: {exc}") from exc
    try:
        onnx.checker.check_model(half)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx2fp16: the float16 graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    onnx.save(half, str(out_path))
    return {"converter": f"onnxconverter_common.float16 {occ_version}", "keep_io_types": True}
