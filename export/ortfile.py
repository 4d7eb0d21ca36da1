"""Run one ONNX file on the ONNX Runtime CPU provider, as a :class:`~kiln.runtime.base.Backend`.

Export and calibration measure candidate graphs (a quantized model with some layers kept in float,
an fp16 graph before it is renamed into the bundle) that are not bundle artifacts yet; this is the
smallest backend that runs such a file. Serving uses :func:`kiln.runtime.load` instead.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from kiln.bundle import Manifest, TensorSpec
from kiln.runtime.base import BaseBackend


class OrtFileBackend(BaseBackend):
    """ONNX Runtime on the CPU for ``path``, with the manifest's tensor specs and batch range."""

    name = "onnxruntime"
    device = "cpu"

    def __init__(self, path: str | os.PathLike[str], manifest: Manifest, *, precision: str = "fp32",
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # the quantized graphs make ORT warn about every unfused Q/DQ pair
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path = Path(path)
        self.precision = precision
        self.inputs = [TensorSpec(name=manifest.input.name, shape=list(manifest.input.shape), dtype=manifest.input.dtype)]
        self.outputs = list(manifest.outputs)
        self.min_batch = 1
        self.max_batch = 1 << 30  # an ONNX file has a free batch axis; the profile applies to engines only
        self._names = [o.name for o in self.outputs]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._names, feeds)
        return dict(zip(self._names, values, strict=True))

    def _close(self) -> None:
        del self.session


def latency_ms(backend: BaseBackend, example: np.ndarray, batch: int, *, warmup: int = 5, runs: int = 30) -> float:
    """Median wall time of one ``infer`` at ``batch`` (``example`` is ``[N, C, H, W]``, repeated as needed)."""
    reps = -(-batch // len(example))
    x = np.ascontiguousarray(np.concatenate([example] * reps)[:batch])
    feeds = {backend.inputs[0].name: x}
    for _ in range(warmup):
        backend.infer(feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.infer(feeds)
        times.append((time.perf_counter() - t0) * 1000.0)
    return round(statistics.median(times), 4)
