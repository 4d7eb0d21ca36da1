"""TensorRT backend: a plain TensorRT plan run with the named-tensor API of TensorRT 10 and 11.

``tensorrt`` is imported when a backend is created, never at import time; other major versions are
refused with a one-line reason. Device memory goes through :mod:`kiln.runtime.cuda` (cuda-python, or
pycuda where that is installed), with the device made current on the calling thread for each call.

Memory: at creation the backend allocates, for every I/O tensor, one device buffer sized from the
tensor's ``DataType.itemsize`` for the optimization profile's *max* batch, and binds the device
addresses once (``set_tensor_address``); the inputs and the outputs kiln.json lists also get a pinned
host buffer. The execution context owns the activation memory TensorRT sizes for that profile.
``infer()`` copies inputs into the pinned buffers, then on one stream: async host->device copies,
``execute_async_v3``, async device->host copies, one synchronize. Outputs are copied out of the
pinned buffers into fresh arrays, so the caller owns them. Whenever a step fails after work was
queued, and in ``close()``, the stream is synchronized before any buffer can be reused or freed.

Options: ``max_batch`` (lower the profile's max; cannot raise it).

Logging: TensorRT's own ``trt.Logger`` prints to stdout, where ``--json`` commands write their answer.
Every Runtime, Builder and parser kiln creates gets :func:`trt_logger` instead: one logger per process
that forwards to Python logging (``kiln.tensorrt``, stderr by default), and the one TensorRT's plugin
library is initialised with, once (the library keeps that logger for the life of the process).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.bundle import Artifact, Bundle, EngineProvenance, TensorSpec
from kiln.errors import BackendUnavailable, BundleError, ConfigError, InputError, KilnError, install_hint
from kiln.runtime import cuda
from kiln.runtime._common import Device, KilnBackend, parse_device, spec_names
from kiln.runtime.engines import (  # re-exported: the engine naming and provenance check are offered here too
    check_provenance as check_provenance,
)
from kiln.runtime.engines import engine_file_name as engine_file_name
from kiln.runtime.engines import parse_capability as parse_capability
from kiln.runtime.engines import timing_cache_name as timing_cache_name
from kiln.runtime.engines import unlist_superseded_engines as unlist_superseded_engines
from kiln.runtime.engines import version_tuple

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger("kiln.runtime")
trt_log = logging.getLogger("kiln.tensorrt")
OPTIONS = frozenset({"max_batch"})
INSTALL_HINT = f"{install_hint('trt')} on a machine with an NVIDIA GPU and driver"
SUPPORTED_MAJORS = (10, 11)


def _installed_version() -> str:
    """The installed TensorRT's version; BackendUnavailable when only tensorrt-stubs (or nothing) is there.

    tensorrt-stubs installs a ``tensorrt`` folder holding only ``.pyi`` files, which Python imports as
    an empty namespace package: having ``Builder`` is what tells the real library apart.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(f"TensorRT is not installed ({exc}): {INSTALL_HINT}") from None
    if not hasattr(tensorrt, "Builder"):
        raise BackendUnavailable(f"TensorRT is not installed (only its type stubs are): {INSTALL_HINT}")
    return str(tensorrt.__version__)


def import_tensorrt() -> int:
    """Check that a supported TensorRT (10 or 11) is importable; return its major version."""
    version = _installed_version()
    major = version_tuple(version)[:1]
    if not major or major[0] not in SUPPORTED_MAJORS:
        raise BackendUnavailable(
            f"TensorRT {version} is not supported: kiln runs TensorRT "
            f"{' and '.join(map(str, SUPPORTED_MAJORS))}"
        )
    return major[0]


def tensorrt_version() -> str | None:
    """The installed TensorRT's version (supported or not), or None."""
    try:
        return _installed_version()
    except BackendUnavailable:
        return None


def unavailable_reason(device: Device | None = None) -> str | None:
    """Why TensorRT cannot run here (library, version, GPU, or a CPU device requested), or None."""
    if device is not None and device.kind == "cpu":
        return "TensorRT runs on a GPU, but device cpu was requested"
    try:
        import_tensorrt()
    except BackendUnavailable as exc:
        return str(exc)
    if (why := cuda.no_gpu_reason()) is not None:
        return f"TensorRT needs an NVIDIA GPU: {why}"
    return None


class _LoggerState:
    """The process-wide TensorRT logger and the module it was made for (tests swap the module)."""

    lock = threading.Lock()
    module: Any = None
    logger: Any = None


def trt_logger() -> Any:
    """The process's TensorRT logger (a ``trt.ILogger``), made on first use; plugins are registered with it.

    TensorRT messages go to the ``kiln.tensorrt`` Python logger: errors as ERROR, warnings as WARNING,
    info and verbose as DEBUG; never to stdout. ``logger.errors_since(mark)`` returns the error
    messages logged after ``mark = logger.error_count`` (builds report them). Thread-safe; every
    Builder, Runtime and OnnxParser kiln creates gets this logger, and it lives as long as the process,
    as the plugin library (``init_libnvinfer_plugins``, called once here) requires.
    """
    import tensorrt as trt

    with _LoggerState.lock:
        if _LoggerState.module is not trt:
            logger = _make_logger(trt)
            # A plan or an ONNX graph may hold layers from TensorRT's plugin library; their creators must
            # be registered before parsing or deserializing (as trtexec and Polygraphy do).
            if not trt.init_libnvinfer_plugins(logger, ""):
                trt_log.warning(
                    "TensorRT: init_libnvinfer_plugins failed; plans with plugin layers will not load")
            _LoggerState.module, _LoggerState.logger = trt, logger
        return _LoggerState.logger


def _make_logger(trt: Any) -> Any:
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}

    class PythonLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._lock = threading.Lock()
            self._errors: collections.deque[str] = collections.deque(maxlen=64)
            self.error_count = 0

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                with self._lock:
                    self._errors.append(msg)
                    self.error_count += 1
            if trt_log.isEnabledFor(level):
                trt_log.log(level, "TensorRT: %s", msg)

        def errors_since(self, mark: int) -> list[str]:
            """Error messages logged after ``error_count`` was ``mark`` (the last 64 at most)."""
            with self._lock:
                new = min(self.error_count - mark, len(self._errors))
                return list(self._errors)[len(self._errors) - new:] if new > 0 else []

    return PythonLogger()


def dims_tuple(dims: trt.Dims | tuple[int, ...]) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple (the stubs give Dims no ``__iter__``, but it indexes like one)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def engine_compatible(provenance: EngineProvenance | Mapping[str, Any] | None,
                      device_index: int = 0) -> tuple[bool, str]:
    """``(ok, reason)``: can this machine run an engine whose kiln.json provenance is ``provenance``?"""
    if (why := unavailable_reason()) is not None:
        return False, why
    import tensorrt as trt

    try:
        gpu = cuda.device_info(device_index)
    except (BackendUnavailable, cuda.CudaError) as exc:
        return False, str(exc)
    return check_provenance(provenance, str(trt.__version__), gpu)


def _numpy_dtype(dtype: trt.DataType) -> np.dtype[Any] | None:
    """The numpy type of a TensorRT DataType, or None (BF16, FP8, INT4, FP4, E8M0 have none)."""
    import tensorrt as trt

    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:  # what trt.nptype raises for a type numpy lacks
        return None


def _nbytes(shape: tuple[int, ...], dtype: trt.DataType) -> int:
    # DataType.itemsize is a fraction for the 4-bit types (0.5) and missing for some; round up to bytes.
    itemsize = getattr(dtype, "itemsize", None)
    if not itemsize:
        raise BackendUnavailable(f"tensorrt: TensorRT reports no element size for {dtype}")
    return math.ceil(int(np.prod(shape, dtype=np.int64)) * float(itemsize))


class TensorRTBackend(KilnBackend):
    """Runs a TensorRT plan on one GPU.

    Thread ownership: the engine's execution context, its stream and its pinned buffers belong to
    one worker thread. Create the backend where convenient, then call ``infer()`` from one thread at a
    time (the serve batcher's worker); a call from a second thread while one runs raises. Each call
    makes the device current on its thread for its duration only. Give each worker its own backend.

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
        if not inputs:
            raise BundleError(f"{path}: kiln.json lists no inputs")
        self._device_index = want.index if want is not None else 0
        self.device = f"cuda:{self._device_index}"
        self.inputs, self.outputs, self.precision = list(inputs), list(outputs), precision
        self._busy = threading.Lock()
        self._buffers: list[cuda.DeviceBuffer | cuda.PinnedBuffer] = []
        self._events: list[cuda.Event] = []
        self._stream: cuda.Stream | None = None
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._device: dict[str, cuda.DeviceBuffer] = {}
        self._host: dict[str, cuda.PinnedBuffer] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self.last_timings: dict[str, float] = {}
        with cuda.activate(self._device_index):
            try:
                engine = self._deserialize(str(path), version_compat)
                names = self._check_tensors(str(path), engine)
                self.min_batch, self.max_batch = self._batch_range(str(path), engine, max_batch)
                self._allocate(str(path), engine, names)
            except BaseException:
                self._release()
                raise

    def _deserialize(self, path: str, version_compat: bool) -> trt.ICudaEngine:
        import tensorrt as trt

        # The process-wide logger: TensorRT's own prints to stdout; it also registered the plugin creators.
        logger = trt_logger()
        runtime = trt.Runtime(logger)
        self._runtime = runtime
        if version_compat:
            # A version-compatible plan carries its own lean runtime, which is host code.
            runtime.engine_host_code_allowed = True
        mark = logger.error_count
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            why = ("; ".join(logger.errors_since(mark)[-2:])
                   or "built by another TensorRT version or for another GPU?")
            raise BackendUnavailable(
                f"tensorrt: cannot deserialize {path} with TensorRT {trt.__version__}: {why}")
        self._engine = engine
        return engine

    def _check_tensors(self, path: str, engine: trt.ICudaEngine) -> list[str]:
        """All I/O tensor names; checks them against kiln.json and records numpy types of those kiln reads or
        writes."""
        import tensorrt as trt

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        wanted = spec_names(self.outputs)
        if sorted(self._inputs) != sorted(spec_names(self.inputs)) or not set(wanted) <= set(self._outputs):
            raise BundleError(
                f"{path}: engine inputs {self._inputs} / outputs {self._outputs} do not match kiln.json "
                f"inputs {spec_names(self.inputs)} / outputs {wanted}"
            )
        for name in [*self._inputs, *wanted]:
            dtype = engine.get_tensor_dtype(name)
            np_dtype = _numpy_dtype(dtype)
            if np_dtype is None:
                # Not a broken bundle: another backend can run the ONNX graph.
                raise BackendUnavailable(
                    f"tensorrt: {path}: tensor {name} is {getattr(dtype, 'name', dtype)}, which numpy cannot "
                    "hold; build the engine with float32/float16/int inputs and outputs"
                )
            self._dtypes[name] = np_dtype
        return names

    def _batch_range(self, path: str, engine: trt.ICudaEngine, max_batch: int | None) -> tuple[int, int]:
        lo, hi = 1, 1 << 31
        for spec in self.inputs:
            shape = dims_tuple(engine.get_tensor_shape(spec.name))
            if list(shape[1:]) != list(spec.shape):
                raise BundleError(
                    f"{path}: engine input {spec.name} has shape {shape}, kiln.json says (N, {spec.shape})")
            pmin, _, pmax = engine.get_tensor_profile_shape(spec.name, 0)
            lo = max(lo, int(pmin[0]))
            hi = min(hi, int(pmax[0]))
        if max_batch is not None:
            if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < lo:
                raise ConfigError(
                    f"tensorrt max_batch must be an integer >= the profile's min {lo}, got {max_batch!r}")
            if max_batch > hi:
                # Not a user error in auto mode: this engine cannot serve that batch, another backend can.
                raise BackendUnavailable(
                    f"tensorrt: engine profile allows batches {lo}..{hi}, max_batch {max_batch} was asked "
                    "for (rebuild the engine with a larger --batch MAX)"
                )
            hi = max_batch
        return lo, hi

    def _allocate(self, path: str, engine: trt.ICudaEngine, names: list[str]) -> None:
        context = engine.create_execution_context()
        if context is None:
            raise cuda.CudaError(
                f"tensorrt: cannot create an execution context for {path} (out of GPU memory?)")
        self._context = context
        self._stream = cuda.Stream()
        self._events = [cuda.Event() for _ in range(4)]
        # Size every buffer for the largest batch: set max shapes, let TensorRT infer output shapes.
        for spec in self.inputs:
            if not context.set_input_shape(spec.name, (self.max_batch, *spec.shape)):
                raise BundleError(f"{path}: engine rejects input {spec.name} at batch {self.max_batch}")
        for n in names:
            shape = dims_tuple(context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise BundleError(
                    f"{path}: output {n} has a data-dependent shape {shape}; kiln needs fixed-size outputs")
            nbytes = _nbytes(shape, engine.get_tensor_dtype(n))
            self._device[n] = cuda.DeviceBuffer(nbytes)
            self._buffers.append(self._device[n])
            if n in self._dtypes:  # only tensors kiln copies in or out need host memory
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
        m = bundle.manifest
        backend = cls(
            path, inputs=[m.input], outputs=bundle.outputs_of(art), precision=art.precision, device=device,
            version_compat=bool(art.engine and art.engine.version_compat), **opts,
        )
        backend.artifact = art.file
        return backend

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._busy.acquire(blocking=False):
            raise KilnError(
                "tensorrt backend called from two threads at once; give each worker its own backend")
        try:
            with cuda.activate(self._device_index):
                return self._run(feeds)
        finally:
            self._busy.release()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, stream = self._context, self._stream
        if context is None or stream is None:
            raise KilnError("tensorrt backend is closed")
        try:
            return self._enqueue_and_wait(context, stream, feeds)
        except BaseException:
            # Copies or the network may still be running on buffers the next call (or close) reuses.
            self._drain()
            raise

    def _enqueue_and_wait(
        self, context: trt.IExecutionContext, stream: cuda.Stream, feeds: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        start, h2d, compute, d2h = self._events
        for name in self._inputs:
            array = feeds[name]
            if not context.set_input_shape(name, array.shape):
                raise InputError(
                    f"Input tensor: {name} | received shape {array.shape} | rejected by the engine profile")
            np.copyto(self._host[name].view(self._dtypes[name], array.shape), array, casting="unsafe")
        start.record(stream)
        for name in self._inputs:
            nbytes = feeds[name].size * self._dtypes[name].itemsize
            cuda.memcpy_htod_async(self._device[name], self._host[name], nbytes, stream)
        h2d.record(stream)
        if not context.execute_async_v3(stream.handle):
            raise cuda.CudaError("tensorrt: execute_async_v3 failed (see the TensorRT log)")
        compute.record(stream)
        shapes = {spec.name: dims_tuple(context.get_tensor_shape(spec.name)) for spec in self.outputs}
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
            spec.name: self._host[spec.name].view(self._dtypes[spec.name],
                                                  shapes[spec.name]).astype(spec.dtype)
            for spec in self.outputs
        }

    def _drain(self) -> None:
        """Wait for everything queued on the stream (enqueueV3: buffers must outlive the work using them)."""
        if self._stream is not None:
            try:
                self._stream.synchronize()
            except cuda.CudaError as exc:  # a faulted context; nothing more can run on it anyway
                log.warning("tensorrt: stream synchronize failed while cleaning up: %s", exc)

    def _close(self) -> None:
        with cuda.activate(self._device_index):
            self._release()

    def _release(self) -> None:
        self._drain()
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
