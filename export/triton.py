"""A Triton Inference Server model repository for a bundle: ``DIR/<model>/config.pbtxt`` + ``1/``.

The config is built as Triton's own ``ModelConfig`` protobuf (shipped in tritonclient) and printed
with ``google.protobuf.text_format``, so it is valid by construction. The ONNX graph is always
copied (``1/model.onnx``); where a TensorRT engine of the same precision was built it is copied as
``1/model.plan`` and the config selects the ``tensorrt_plan`` platform (delete that line pair to fall
back to ONNX Runtime in Triton). The class names are written to ``labels.txt`` beside config.pbtxt (one
per line, class 0 first), which the class outputs name as their ``label_filename``; each output's
meaning is described in the config's ``parameters``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from kiln.bundle import BatchRange, Bundle
from kiln.errors import ExportError
from kiln.fsutil import atomic_path, atomic_write_text
from kiln.triton_config import LABELS_FILE, TritonOptions, model_config

log = logging.getLogger(__name__)

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
    end_to_end_file: str | None = None,
) -> Path:
    """Write ``repo/<model>/`` and return the model folder. Other models in ``repo`` are left alone.

    ``end_to_end_file`` (a detector's graph with NMS inside, ``kiln export --nms``) is served instead of
    ``onnx_file`` and ``engine_file``, with its own outputs and its NMS settings in the config's parameters.
    """
    from google.protobuf import text_format

    options = options or TritonOptions()
    if end_to_end_file:
        art = bundle.manifest.artifacts[end_to_end_file]
        if engine_file:
            log.info("Triton: serving the end-to-end graph %s with ONNX Runtime (engines are built from the "
                     "raw graph; --triton-raw serves %s)", end_to_end_file, engine_file)
        onnx_file, engine_file = end_to_end_file, None
        options = dataclasses.replace(options, outputs=tuple(bundle.outputs_of(art)),
                                      nms=art.nms.model_dump() if art.nms else None)
    if engine_file and batch.min > 1:
        # Triton may send any batch from 1 to max_batch_size; a plan whose profile starts higher rejects it.
        raise ExportError("--triton-repo with --engine needs a batch range starting at 1 (got --batch "
                          f"{batch}): Triton's dynamic batcher sends batches from 1 up to max_batch_size")
    if bad := [c for c in bundle.manifest.classes if "\n" in c or "\r" in c]:
        raise ExportError(f"--triton-repo: class names with a line break cannot go in {LABELS_FILE}: {bad}")
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
    atomic_write_text(folder / LABELS_FILE, "".join(f"{c}\n" for c in bundle.manifest.classes))
    options = dataclasses.replace(options, label_filename=LABELS_FILE)
    cfg = model_config(bundle, batch, platform=platform, name=name, options=options)
    atomic_write_text(folder / "config.pbtxt", text_format.MessageToString(cfg))
    log.info("Triton model repository: %s (%s)", folder, platform)
    return folder


def read_config(path: str | os.PathLike[str]) -> Any:
    """Parse a config.pbtxt back into ``ModelConfig`` (raises ``text_format.ParseError`` if invalid)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
