"""TensorRT backend: a plain TensorRT plan run with the named-tensor API of TensorRT 10/11.

``tensorrt`` is imported when a backend is created, never at import time. Device memory goes through
:mod:`kiln.runtime.cuda` (cuda-python, or pycuda where that is installed).

Memory: at creation the backend allocates, for every I/O tensor, one device buffer and one pinned
host buffer sized for the optimization profile's *max* batch, and binds the device addresses once
(``set_tensor_address``). The execution context owns the activation memory TensorRT sizes for that
profile. ``infer()`` copies inputs into the pinned buffers, then on one stream: async host->device
copies, ``execute_async_v3``, async device->host copies, one synchronize. Outputs are copied out of
the pinned buffers into fresh arrays, so the caller owns them.

Options: ``max_batch`` (lower the profile's max; cannot raise it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.bundle import Artifact, Bundle, TensorSpec
from kiln.errors import BackendUnavailable, BundleError, ConfigError, InputError, KilnError
from kiln.runtime import cuda
from kiln.runtime._common import Device, KilnBackend, parse_device, spec_names

if TYPE_CHECKING:
    import tensorrt as trt

OPTIONS = frozenset({"max_batch"})
INSTALL_HINT = "pip install 'kiln[trt]' on a machine with an NVIDIA GPU and driver"
PROVENANCE_KEYS = ("tensorrt_version", "gpu_name", "compute_capability")


def import_tensorrt() -> None:
    """Raise :class:`BackendUnavailable` unless the real TensorRT Python package is importable.

    tensorrt-stubs installs a ``tensorrt`` folder holding only ``.pyi`` files, which Python imports as
    an empty namespace package: having ``Builder`` is what tells the real library apart.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT is not installed ({exc}): {INSTALL_HINT}") from None
    if not hasattr(tensorrt, "Builder"):
        raise BackendUnavailable(f"TensorRT is not installed (only its type stubs are): {INSTALL_HINT}")


def tensorrt_version() -> str | None:
    try:
        import_tensorrt()
    except BackendUnavailable:
        return None
    import tensorrt as trt

    return str(trt.__version__)


def unavailable_reason(device: Device | None = None) -> str | None:
    """Why TensorRT cannot run here (library, GPU, or a CPU device requested), or None."""
    if device is not None and device.kind == "cpu":
        return "TensorRT runs on a GPU, but device cpu was requested"
    try:
        import_tensorrt()
    except BackendUnavailable as exc:
        return str(exc)
    if (why := cuda.no_gpu_reason()) is not None:
        return f"TensorRT needs an NVIDIA GPU: {why}"
    return None


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    # Dims indexes like a tuple but the stubs give it no __iter__.
    return tuple(int(dims[i]) for i in range(len(dims)))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def check_provenance(provenance: Mapping[str, Any], version: str, gpu: cuda.DeviceInfo) -> tuple[bool, str]:
    """Whether an engine built as ``provenance`` says can run on TensorRT ``version`` and ``gpu``.

    A plan runs only on the TensorRT version that built it, unless built version-compatible (then on
    the same major version, same or newer); only on GPUs of its compute capability, unless built
    hardware-compatible (AMPERE_PLUS: compute capability 8.0 or newer).
    """
    missing = [k for k in PROVENANCE_KEYS if not provenance.get(k)]
    if missing:
        return False, f"engine has no build provenance in kiln.json (missing {', '.join(missing)}); rebuild it"
    built_v, here_v = str(provenance["tensorrt_version"]), version
    if provenance.get("version_compat"):
        if _version(built_v)[:1] != _version(here_v)[:1] or _version(here_v) < _version(built_v):
            return False, f"version-compatible engine built with TensorRT {built_v} cannot run on TensorRT {here_v}"
    elif _version(built_v)[:3] != _version(here_v)[:3]:
        return False, f"engine built with TensorRT {built_v}, this is TensorRT {here_v} (rebuild it here)"
    built_cc, here_cc = _capability(provenance["compute_capability"]), _capability(gpu.compute_capability)
    built_gpu = provenance["gpu_name"]
    if provenance.get("hardware_compat"):
        if here_cc < (8, 0):
            return False, f"hardware-compatible engine needs compute capability >= 8.0, {gpu.name} has {gpu.compute_capability}"
        return True, f"hardware-compatible engine built on {built_gpu} runs on {gpu.name}"
    if built_cc != here_cc:
        return False, (
            f"engine built for {built_gpu} (compute capability {provenance['compute_capability']}), "
            f"this GPU is {gpu.name} ({gpu.compute_capability})"
        )
    if built_gpu != gpu.name:
        return True, f"engine built on {built_gpu}, running on {gpu.name} (same compute capability)"
    return True, f"engine built here ({gpu.name}, TensorRT {built_v})"


def engine_compatible(provenance: Mapping[str, Any], device_index: int = 0) -> tuple[bool, str]:
    """``(ok, reason)``: can this machine run an engine whose kiln.json provenance is ``provenance``?"""
    if (why := unavailable_reason()) is not None:
        return False, why
    import tensorrt as trt

    try:
        gpu = cuda.device_info(device_index)
    except (BackendUnavailable, cuda.CudaError) as exc:
        return False, str(exc)
    return check_provenance(provenance, str(trt.__version__), gpu)


class TensorRTBackend(KilnBackend):
    """Runs a TensorRT plan on one GPU.

    Thread ownership: the engine's execution context, its stream and its pinned buffers belong to
    one worker thread. Create the backend where convenient, then call ``infer()`` from one thread at a
    time (the serve batcher's worker); a call from a second thread while one runs raises, and the
    first call on a new thread makes the device current there. Give each worker its own backend.

    ``last_timings`` holds ``h2d_ms``, ``compute_ms``, ``d2h_ms`` and ``total_ms`` of the latest
    ``infer()``, measured with CUDA events on the stream (what ``trtexec`` calls H2D, GPU compute, D2H).
    """

    name = "tensorrt"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        precision: str = "fp32",
        device: str | None = None,
        max_batch: int | None = None,
        version_compat: bool = False,
    ) -> None:
        super().__init__()
        want = parse_device(device)
        if (why := unavailable_reason(want)) is not None:
            raise BackendUnavailable(f"tensorrt: {why}")
        import tensorrt as trt

        self._device_index = want.index if want is not None else 0
        cuda.use_device(self._device_index)
        self.device = f"cuda:{self._device_index}"
        self._busy = threading.Lock()
        self._thread = threading.get_ident()
        self._buffers: list[cuda.DeviceBuffer | cuda.PinnedBuffer] = []
        self._events: list[cuda.Event] = []
        self._stream: cuda.Stream | None = None

        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._runtime: trt.Runtime | None = runtime
        if version_compat:
            # A version-compatible plan carries its own lean runtime, which is host code.
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise BackendUnavailable(
                f"tensorrt: cannot deserialize {path} with TensorRT {trt.__version__} "
                "(built by another TensorRT version or for another GPU? see the TensorRT log above)"
            )
        self._engine: trt.ICudaEngine | None = engine

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self._inputs) != sorted(spec_names(inputs)) or not set(spec_names(outputs)) <= set(self._outputs):
            raise BundleError(
                f"{path}: engine inputs {self._inputs} / outputs {self._outputs} do not match kiln.json "
                f"inputs {spec_names(inputs)} / outputs {spec_names(outputs)}"
            )
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}

        if not inputs:
            raise BundleError(f"{path}: kiln.json lists no inputs")
        lo, hi = 1, 1 << 31
        for spec in inputs:
            shape = _dims(engine.get_tensor_shape(spec.name))
            if list(shape[1:]) != list(spec.shape):
                raise BundleError(f"{path}: engine input {spec.name} has shape {shape}, kiln.json says (N, {spec.shape})")
            pmin, _, pmax = engine.get_tensor_profile_shape(spec.name, 0)
            lo = max(lo, pmin[0])
            hi = min(hi, pmax[0])
        if max_batch is not None:
            if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < lo:
                raise ConfigError(f"tensorrt max_batch must be an integer >= the profile's min {lo}, got {max_batch!r}")
            if max_batch > hi:
                # Not a user error in auto mode: this engine cannot serve that batch, another backend can.
                raise BackendUnavailable(
                    f"tensorrt: engine profile allows batches {lo}..{hi}, max_batch {max_batch} was asked for "
                    "(rebuild the engine with a larger --batch MAX)"
                )
            hi = max_batch
        self.min_batch, self.max_batch = int(lo), int(hi)
        self.inputs, self.outputs, self.precision = list(inputs), list(outputs), precision

        self._context: trt.IExecutionContext | None = None
        self._device: dict[str, cuda.DeviceBuffer] = {}
        self._host: dict[str, cuda.PinnedBuffer] = {}
        self.last_timings: dict[str, float] = {}
        try:
            self._allocate(str(path), engine, names)
        except BaseException:
            self._close()
            raise

    def _allocate(self, path: str, engine: trt.ICudaEngine, names: list[str]) -> None:
        context = engine.create_execution_context()
        if context is None:
            raise cuda.CudaError(f"tensorrt: cannot create an execution context for {path} (out of GPU memory?)")
        self._context = context
        self._stream = cuda.Stream()
        self._events = [cuda.Event() for _ in range(4)]
        # Size every buffer for the largest batch: set max shapes, let TensorRT infer output shapes.
        for spec in self.inputs:
            if not context.set_input_shape(spec.name, (self.max_batch, *spec.shape)):
                raise BundleError(f"{path}: engine rejects input {spec.name} at batch {self.max_batch}")
        for n in names:
            shape = _dims(context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise BundleError(f"{path}: output {n} has a data-dependent shape {shape}; kiln needs fixed-size outputs")
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[n].itemsize
            self._device[n] = cuda.DeviceBuffer(nbytes)
            self._buffers.append(self._device[n])
            self._host[n] = cuda.PinnedBuffer(nbytes)
            self._buffers.append(self._host[n])
            # Addresses are bound once: the buffers live as long as the context.
            if not context.set_tensor_address(n, self._device[n].ptr):
                raise cuda.CudaError(f"tensorrt: set_tensor_address({n}) failed")

    @classmethod
    def from_artifact(
        cls, bundle: Bundle, art: Artifact, *, device: str | None = None, **opts: Any
    ) -> TensorRTBackend:
        path = bundle.verify_artifact(art)
        extra = art.model_extra or {}
        m = bundle.manifest
        backend = cls(
            path, inputs=[m.input], outputs=m.outputs, precision=art.precision, device=device,
            version_compat=bool(extra.get("version_compat")), **opts,
        )
        backend.artifact = art.file
        return backend

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._busy.acquire(blocking=False):
            raise KilnError("tensorrt backend called from two threads at once; give each worker its own backend")
        try:
            if threading.get_ident() != self._thread:
                cuda.use_device(self._device_index)
                self._thread = threading.get_ident()
            return self._run(feeds)
        finally:
            self._busy.release()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, stream = self._context, self._stream
        if context is None or stream is None:
            raise KilnError("tensorrt backend is closed")
        start, h2d, compute, d2h = self._events
        for name in self._inputs:
            array = feeds[name]
            if not context.set_input_shape(name, array.shape):
                raise InputError(f"Input tensor: {name} | received shape {array.shape} | rejected by the engine profile")
            np.copyto(self._host[name].view(self._dtypes[name], array.shape), array, casting="unsafe")
        start.record(stream)
        for name in self._inputs:
            nbytes = feeds[name].size * self._dtypes[name].itemsize
            cuda.memcpy_htod_async(self._device[name], self._host[name], nbytes, stream)
        h2d.record(stream)
        if not context.execute_async_v3(stream.handle):
            raise cuda.CudaError("tensorrt: execute_async_v3 failed (see the TensorRT log)")
        compute.record(stream)
        shapes = {n: _dims(context.get_tensor_shape(n)) for n in self._outputs}
        for name, shape in shapes.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize
            cuda.memcpy_dtoh_async(self._host[name], self._device[name], nbytes, stream)
        d2h.record(stream)
        stream.synchronize()
        self.last_timings = {
            "h2d_ms": h2d.elapsed_ms(start),
            "compute_ms": compute.elapsed_ms(h2d),
            "d2h_ms": d2h.elapsed_ms(compute),
            "total_ms": d2h.elapsed_ms(start),
        }
        # astype copies: the pinned buffers are reused by the next call.
        return {
            spec.name: self._host[spec.name].view(self._dtypes[spec.name], shapes[spec.name]).astype(spec.dtype)
            for spec in self.outputs
        }

    def _close(self) -> None:
        # The context references the device buffers: destroy it (then the engine) before freeing them.
        self._context = None
        self._engine = None
        self._runtime = None
        for buf in self._buffers:
            buf.free()
        for ev in self._events:
            ev.destroy()
        if self._stream is not None:
            self._stream.destroy()
        self._buffers, self._events, self._stream = [], [], None
