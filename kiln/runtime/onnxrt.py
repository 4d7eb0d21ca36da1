"""ONNX Runtime backend: CPU or CUDA execution provider, thread and graph-optimization settings,
IO binding on CUDA. ``onnxruntime`` is imported when a backend is created, not at import time.

Options (``load(..., threads=2)``):
  threads           intra-op threads (default: ONNX Runtime's choice, one per physical core)
  inter_op_threads  inter-op threads (only matter with parallel execution; default ORT's)
  optimization      graph optimization level: disable | basic | extended | all (default all)
  io_binding        bind outputs on the device (default True on CUDA; ignored on CPU)
  max_batch         largest batch accepted (default: the manifest's batch max)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kiln.bundle import Artifact, Bundle, TensorSpec
from kiln.errors import BackendUnavailable, BundleError, ConfigError, install_hint, unknown_choice
from kiln.runtime import cuda
from kiln.runtime._common import Device, KilnBackend, batch_limits, installed, parse_device, spec_names

OPTIONS = frozenset({"threads", "inter_op_threads", "optimization", "io_binding", "max_batch"})
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


def unavailable_reason(device: Device | None = None) -> str | None:
    """Why this backend cannot run on ``device`` here, or None (cheap: no session is created)."""
    if not installed("onnxruntime"):
        return f"onnxruntime is not installed ({install_hint('serve')})"
    if device is not None and device.kind == "cuda":
        import onnxruntime as ort

        if CUDA_EP not in ort.get_available_providers():
            return ("device cuda requested but this onnxruntime has no CUDA provider "
                    "(pip install onnxruntime-gpu)")
        if (why := cuda.no_gpu_reason()) is not None:
            return f"device cuda requested but {why}"
    return None


class OnnxRuntimeBackend(KilnBackend):
    """Runs an ONNX graph with ONNX Runtime. Outputs are fresh numpy arrays owned by the caller.

    ONNX Runtime's ``InferenceSession.run`` may be called from several threads at once: on the CPU the
    backend says so (``thread_safe``), and a server may run a lone small request without a thread hop.
    """

    name = "onnxrt"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        precision: str = "fp32",
        device: str | None = None,
        max_batch: int = 32,
        threads: int | None = None,
        inter_op_threads: int | None = None,
        optimization: str = "all",
        io_binding: bool | None = None,
    ) -> None:
        super().__init__()
        if (why := unavailable_reason(parse_device(device))) is not None:
            raise BackendUnavailable(f"onnxrt: {why}")
        import onnxruntime as ort

        if optimization not in OPTIMIZATION_LEVELS:
            raise unknown_choice("level", optimization, OPTIMIZATION_LEVELS, flag="onnxrt optimization",
                                 ordered=True)
        for opt, value in (("threads", threads), ("inter_op_threads", inter_op_threads)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"onnxrt {opt} must be a positive integer, got {value!r}")

        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if threads is not None:
            options.intra_op_num_threads = threads
        if inter_op_threads is not None:
            options.inter_op_num_threads = inter_op_threads
        options.log_severity_level = 3  # errors only: ORT's warnings about fallbacks are logged by kiln

        want = parse_device(device)
        use_cuda = (want is None and CUDA_EP in ort.get_available_providers()
                    and cuda.device_count() > 0) or (
            want is not None and want.kind == "cuda"
        )
        index = want.index if want is not None else 0
        providers: list[Any] = [(CUDA_EP, {"device_id": index}), CPU_EP] if use_cuda else [CPU_EP]
        try:
            self._session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise BundleError(f"onnxrt cannot load {path}: {exc}") from exc
        active = self._session.get_providers()
        if use_cuda and CUDA_EP not in active:
            if want is not None:
                raise BackendUnavailable(
                    f"onnxrt: the CUDA provider could not start on cuda:{index} (active: {active})")
            use_cuda = False
        self.device = f"cuda:{index}" if use_cuda else "cpu"
        self.thread_safe = not use_cuda
        self._device_index = index
        self._io_binding = use_cuda and (io_binding is None or io_binding)

        graph_inputs = {i.name: i for i in self._session.get_inputs()}
        graph_outputs = [o.name for o in self._session.get_outputs()]
        if (sorted(graph_inputs) != sorted(spec_names(inputs))
                or not set(spec_names(outputs)) <= set(graph_outputs)):
            raise BundleError(
                f"{path}: graph inputs {sorted(graph_inputs)} / outputs {graph_outputs} do not match "
                f"kiln.json inputs {spec_names(inputs)} / outputs {spec_names(outputs)}"
            )
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.precision = precision
        self.min_batch, self.max_batch = 1, max_batch
        for spec in inputs:
            batch_dim = graph_inputs[spec.name].shape[0]
            if isinstance(batch_dim, int):  # a graph exported with a fixed batch takes exactly that batch
                self.min_batch = self.max_batch = batch_dim
        self._output_names = spec_names(outputs)

    @classmethod
    def from_artifact(
        cls, bundle: Bundle, art: Artifact, *, device: str | None = None, max_batch: int | None = None,
        **opts: Any
    ) -> OnnxRuntimeBackend:
        path = bundle.verify_artifact(art)
        m = bundle.manifest
        _, top = batch_limits(m.input.batch, max_batch)
        backend = cls(path, inputs=[m.input], outputs=bundle.outputs_of(art), precision=art.precision,
                      device=device, max_batch=top, **opts)
        backend.artifact = art.file
        return backend

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        if not self._io_binding:
            results = self._session.run(self._output_names, feeds)
            return dict(zip(self._output_names, results, strict=True))
        # IO binding keeps outputs on the GPU until one copy back, instead of ORT allocating host
        # outputs and synchronizing per tensor.
        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name in self._output_names:
            binding.bind_output(name, "cuda", self._device_index)
        self._session.run_with_iobinding(binding)
        results = binding.copy_outputs_to_cpu()
        return dict(zip(self._output_names, results, strict=True))

    def _close(self) -> None:
        del self._session
