"""ONNX Runtime on the CPU for a graph that is not (yet) a bundle artifact.

Export and calibration measure candidate graphs (a quantized model with some layers kept in float,
an fp16 graph before it is renamed into the bundle). They run on the CPU provider on purpose: every
precision is judged by the same runtime, before any GPU is involved.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import numpy as np

from kiln.bench import time_backend
from kiln.bundle import Manifest
from kiln.runtime.onnxrt import OnnxRuntimeBackend

# An ONNX file has a free batch axis; the batch profile applies to engines and serving only.
_ANY_BATCH = 1 << 16


def OrtFileBackend(path: str | os.PathLike[str], manifest: Manifest, *, precision: str = "fp32",  # noqa: N802
                   threads: int | None = None) -> OnnxRuntimeBackend:
    """A :class:`kiln.runtime.OnnxRuntimeBackend` on the CPU for ``path`` with the manifest's tensors."""
    return OnnxRuntimeBackend(path, inputs=[manifest.input], outputs=list(manifest.outputs),
                              precision=precision, device="cpu", max_batch=_ANY_BATCH, threads=threads)


def latency_ms(backend: Any, example: np.ndarray, batch: int, *, warmup: int = 5, runs: int = 30) -> float:
    """Median wall time (ms) of one ``infer`` at ``batch``; ``example`` ``[N, C, H, W]`` is tiled as
    needed."""
    reps = -(-batch // len(example))
    x = np.ascontiguousarray(np.concatenate([example] * reps)[:batch])
    samples, _, _, _ = time_backend(backend, {backend.inputs[0].name: x}, warmup, runs, None)
    return round(statistics.median(samples), 4)
