"""A small CUDA memory module for the TensorRT backend: device buffers, pinned host buffers, async
copies, one stream, events for timing.

It sits on NVIDIA's cuda-python bindings (``from cuda.bindings import runtime as cudart``; every call
returns an error code first, and :func:`check` turns a non-zero code into :class:`CudaError`) or on
pycuda where that is what is installed. Both drive the device's *primary* context, the one TensorRT
uses. The library is imported on first use: importing this module needs neither.

Every call that touches the device runs inside ``with activate(index):``. With cuda-python that is
``cudaSetDevice``; with pycuda it pushes the primary context onto the calling thread's context stack
only when it is not already current, and pops it again before the block ends. So no thread is left
with a context on its stack when kiln returns, closes a backend, or the thread ends (pycuda aborts
the process at exit when a thread's stack is not empty).

Pointers are plain ``int`` device addresses, which is what TensorRT's ``set_tensor_address`` and
``execute_async_v3`` take.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.errors import BackendUnavailable, KilnError, install_hint

INSTALL_HINT = f"{install_hint('trt')} on a machine with an NVIDIA GPU and driver"


class CudaError(KilnError, RuntimeError):
    """A CUDA runtime call failed (out of memory, invalid device, a kernel fault...)."""


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "major.minor", e.g. "8.9"
    total_memory: int  # bytes


_lock = threading.Lock()
_api: _Api | None = None


def api() -> _Api:
    """The CUDA library in use (cuda-python, else pycuda); raises BackendUnavailable if neither imports."""
    global _api
    with _lock:
        if _api is None:
            _api = _load_api()
        return _api


def _load_api() -> _Api:
    errors: list[str] = []
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as exc:
        errors.append(f"cuda-python: {exc}")
    else:
        try:
            from cuda.bindings.utils import get_cuda_native_handle
        except ImportError:  # cuda-bindings before 12.9 has no utils module; int() is the API there
            return _CudaPython(cudart)
        return _CudaPython(cudart, get_cuda_native_handle)
    try:
        import pycuda.driver as pycuda_driver
    except ImportError as exc:
        errors.append(f"pycuda: {exc}")
    else:
        return _PyCuda(pycuda_driver)
    raise BackendUnavailable(f"no CUDA Python bindings are installed ({'; '.join(errors)}): {INSTALL_HINT}")


def library() -> str:
    """``"cuda-python"`` or ``"pycuda"``."""
    return api().name


def device_count() -> int:
    """Number of visible CUDA devices; 0 when there is no driver or no bindings (never raises)."""
    try:
        return api().device_count()
    except (BackendUnavailable, CudaError):
        return 0


def no_gpu_reason() -> str | None:
    """Why CUDA cannot be used here (no bindings, no or a mismatched driver, no device), or None."""
    try:
        n = api().device_count()
    except (BackendUnavailable, CudaError) as exc:
        return str(exc)
    return None if n > 0 else "no CUDA device is visible"


def device_info(index: int = 0) -> DeviceInfo:
    a = api()
    n = a.device_count()
    if not 0 <= index < n:
        raise BackendUnavailable(f"CUDA device {index} does not exist ({n} visible)")
    return a.device_info(index)


def activate(index: int) -> AbstractContextManager[None]:
    """Make device ``index`` current on the calling thread for the ``with`` block (see the module doc)."""
    return api().activate(index)


def check(result: Any, call: str = "CUDA call", cudart: Any = None) -> Any:
    """Unpack a cuda-python result ``(err, *values)``: raise :class:`CudaError` unless err is success.

    Returns None, the single value, or a tuple of values. ``cudart`` is the runtime module that
    produced ``result`` (default: ``cuda.bindings.runtime``).
    """
    if cudart is None:
        from cuda.bindings import runtime

        cudart = runtime
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(cudart.cudaError_t.cudaSuccess):
        _, name = cudart.cudaGetErrorName(err)
        _, text = cudart.cudaGetErrorString(err)
        raise CudaError(f"{call} failed: {_text(name)}: {_text(text)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _text(b: bytes | str) -> str:
    return b.decode(errors="replace").rstrip("\x00") if isinstance(b, bytes) else str(b)


class DeviceBuffer:
    """``nbytes`` of device memory at ``ptr``. Freed by :meth:`free` (idempotent).

    Free it only when no queued work uses it: synchronize the stream first.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        self._api = api()
        self.ptr: int = self._api.malloc(self.nbytes)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self._api.free(ptr)
class PinnedBuffer:
    """Page-locked host memory (so copies can be asynchronous), exposed as a flat uint8 numpy array."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)
        self._api = api()
        self.array, release = self._api.malloc_host(self.nbytes)
        self._release: Callable[[], None] | None = release
        self.ptr: int = int(self.array.ctypes.data)

    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
        """The first ``prod(shape) * itemsize`` bytes as an array of ``dtype`` and ``shape`` (no copy)."""
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if count > self.nbytes:
            raise CudaError(f"pinned buffer of {self.nbytes} bytes cannot hold {shape} {dtype}")
        return self.array[:count].view(dtype).reshape(shape)

    def free(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            self.array = np.empty(0, np.uint8)
            self.ptr = 0
            release()


class Stream:
    """A non-blocking CUDA stream; ``handle`` is the int TensorRT's ``execute_async_v3`` takes."""

    def __init__(self) -> None:
        self._api = api()
        self._obj, self.handle = self._api.stream_create()

    def synchronize(self) -> None:
        if self._obj is not None:
            self._api.stream_sync(self._obj)

    def destroy(self) -> None:
        if self._obj is not None:
            self._api.stream_destroy(self._obj)
            self._obj = None


class Event:
    """A CUDA event recorded on a stream; :meth:`elapsed_ms` times the GPU work between two events."""

    def __init__(self) -> None:
        self._api = api()
        self._obj: Any = self._api.event_create()

    def record(self, stream: Stream) -> None:
        self._api.event_record(self._obj, stream._obj)

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event (both recorded and completed)."""
        return self._api.event_elapsed(start._obj, self._obj)

    def destroy(self) -> None:
        if self._obj is not None:
            self._api.event_destroy(self._obj)
            self._obj = None


def memcpy_htod_async(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    if nbytes > min(dst.nbytes, src.nbytes):
        raise CudaError(f"copy of {nbytes} bytes overruns a buffer ({src.nbytes} host, {dst.nbytes} device)")
    api().htod_async(dst.ptr, src, nbytes, stream._obj)


def memcpy_dtoh_async(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    if nbytes > min(dst.nbytes, src.nbytes):
        raise CudaError(f"copy of {nbytes} bytes overruns a buffer ({dst.nbytes} host, {src.nbytes} device)")
    api().dtoh_async(dst, src.ptr, nbytes, stream._obj)



class _Api:
    """What the rest of this module needs from a CUDA binding."""

    name = "none"

    def device_count(self) -> int:
        raise NotImplementedError

    def device_info(self, index: int) -> DeviceInfo:
        raise NotImplementedError

    def activate(self, index: int) -> AbstractContextManager[None]:
        raise NotImplementedError

    def malloc(self, nbytes: int) -> int:
        raise NotImplementedError

    def free(self, ptr: int) -> None:
        raise NotImplementedError

    def malloc_host(self, nbytes: int) -> tuple[np.ndarray, Callable[[], None]]:
        raise NotImplementedError

    def stream_create(self) -> tuple[Any, int]:
        raise NotImplementedError

    def stream_sync(self, stream: Any) -> None:
        raise NotImplementedError

    def stream_destroy(self, stream: Any) -> None:
        raise NotImplementedError

    def event_create(self) -> Any:
        raise NotImplementedError

    def event_record(self, event: Any, stream: Any) -> None:
        raise NotImplementedError

    def event_elapsed(self, start: Any, end: Any) -> float:
        raise NotImplementedError

    def event_destroy(self, event: Any) -> None:
        raise NotImplementedError

    def htod_async(self, dst: int, src: PinnedBuffer, nbytes: int, stream: Any) -> None:
        raise NotImplementedError

    def dtoh_async(self, dst: PinnedBuffer, src: int, nbytes: int, stream: Any) -> None:
        raise NotImplementedError


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"  # CUDA encodes 12.4 as 12040


class _CudaPython(_Api):
    """cuda-python's runtime module (``cuda.bindings.runtime``): every call returns ``(err, *values)``.

    ``native_handle`` is ``cuda.bindings.utils.get_cuda_native_handle`` where the bindings have it
    (``int(obj)`` on their objects is deprecated there); older bindings only offer ``int``.
    """

    name = "cuda-python"

    def __init__(self, cudart: Any, native_handle: Callable[[Any], int] | None = None) -> None:
        self.rt = cudart
        self._native_handle: Callable[[Any], int] = native_handle or int

    def check(self, result: Any, call: str) -> Any:
        return check(result, call, self.rt)

    def device_count(self) -> int:
        err, n = self.rt.cudaGetDeviceCount()
        codes = self.rt.cudaError_t
        if int(err) == int(codes.cudaErrorNoDevice):
            return 0
        if int(err) == int(codes.cudaErrorInsufficientDriver):
            raise BackendUnavailable(self._driver_mismatch())
        return int(self.check((err, n), "cudaGetDeviceCount"))

    def _driver_mismatch(self) -> str:
        """cudaErrorInsufficientDriver: the driver is missing or older than the bindings' CUDA."""
        ok = int(self.rt.cudaError_t.cudaSuccess)
        err, runtime = self.rt.cudaRuntimeGetVersion()
        bindings = f"CUDA {_cuda_version(int(runtime))}" if int(err) == ok else "their CUDA version"
        major = f"{int(runtime) // 1000}.x" if int(err) == ok else "x"
        err, driver = self.rt.cudaDriverGetVersion()
        if int(err) != ok or not driver:
            return ("no NVIDIA driver is loaded (cudaErrorInsufficientDriver): the cuda-python bindings "
                    f"need a driver for {bindings} or newer: {INSTALL_HINT}")
        return (
            f"CUDA driver/bindings mismatch (cudaErrorInsufficientDriver): cuda-python {major} uses "
            f"{bindings}, the driver supports CUDA {_cuda_version(int(driver))}; install the cuda-python "
            "whose major version matches the driver and TensorRT (see docs/runtime.md), or update the driver"
        )

    def device_info(self, index: int) -> DeviceInfo:
        prop = self.check(self.rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
        return DeviceInfo(index, _text(prop.name), f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem))

    @contextlib.contextmanager
    def activate(self, index: int) -> Iterator[None]:
        # The runtime API binds the device's primary context to the thread; there is nothing to undo.
        self.check(self.rt.cudaSetDevice(index), f"cudaSetDevice({index})")
        yield

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))  # a plain int address

    def free(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def malloc_host(self, nbytes: int) -> tuple[np.ndarray, Callable[[], None]]:
        ptr = int(self.check(self.rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
        return array, lambda: self.check(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def stream_create(self) -> tuple[Any, int]:
        stream = self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking),
                            "cudaStreamCreate")
        return stream, int(self._native_handle(stream))

    def stream_sync(self, stream: Any) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream: Any) -> None:
        self.check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def event_create(self) -> Any:
        return self.check(self.rt.cudaEventCreate(), "cudaEventCreate")

    def event_record(self, event: Any, stream: Any) -> None:
        self.check(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def event_elapsed(self, start: Any, end: Any) -> float:
        return float(self.check(self.rt.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))

    def event_destroy(self, event: Any) -> None:
        self.check(self.rt.cudaEventDestroy(event), "cudaEventDestroy")

    def htod_async(self, dst: int, src: PinnedBuffer, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src.ptr, nbytes, kind, stream),
                   "cudaMemcpyAsync(host->device)")

    def dtoh_async(self, dst: PinnedBuffer, src: int, nbytes: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(dst.ptr, src, nbytes, kind, stream),
                   "cudaMemcpyAsync(device->host)")


class _PyCuda(_Api):
    """pycuda's driver API. pycuda raises its own exceptions; they are re-raised as CudaError.

    The driver API keeps a context *stack* per thread: :meth:`activate` pushes the primary context
    only when it is not current on the calling thread and pops what it pushed before returning.
    """

    name = "pycuda"

    def __init__(self, drv: Any) -> None:
        self.drv = drv
        self._initialized = False
        self._lock = threading.Lock()
        self._contexts: dict[int, Any] = {}
        self._allocs: dict[int, Any] = {}  # keeps pycuda's allocation objects alive until free()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self.drv.Error as exc:
            raise CudaError(f"{what} failed: {exc}") from exc

    def _init(self) -> None:
        if not self._initialized:
            self._call("cuInit", self.drv.init)
            self._initialized = True

    def device_count(self) -> int:
        try:
            self._init()
        except CudaError:
            return 0
        return int(self._call("cuDeviceGetCount", self.drv.Device.count))

    def device_info(self, index: int) -> DeviceInfo:
        self._init()
        dev = self._call("cuDeviceGet", self.drv.Device, index)
        major, minor = dev.compute_capability()
        return DeviceInfo(index, str(dev.name()), f"{major}.{minor}", int(dev.total_memory()))

    def _primary(self, index: int) -> Any:
        # The primary context is the one TensorRT and the CUDA runtime use; retaining it (instead of
        # pycuda.autoinit's private context) keeps every library on the same context.
        with self._lock:
            self._init()
            ctx = self._contexts.get(index)
            if ctx is None:
                ctx = self._call("cuDevicePrimaryCtxRetain", self.drv.Device(index).retain_primary_context)
                self._contexts[index] = ctx
            return ctx

    @contextlib.contextmanager
    def activate(self, index: int) -> Iterator[None]:
        ctx = self._primary(index)
        pushed = False
        if self.drv.Context.get_current() != ctx:
            self._call("cuCtxPushCurrent", ctx.push)
            pushed = True
        try:
            yield
        finally:
            if pushed:
                self._call("cuCtxPopCurrent", self.drv.Context.pop)

    def malloc(self, nbytes: int) -> int:
        alloc = self._call(f"cuMemAlloc({nbytes})", self.drv.mem_alloc, nbytes)
        ptr = int(alloc)
        self._allocs[ptr] = alloc
        return ptr

    def free(self, ptr: int) -> None:
        alloc = self._allocs.pop(ptr, None)
        if alloc is not None:
            self._call("cuMemFree", alloc.free)

    def malloc_host(self, nbytes: int) -> tuple[np.ndarray, Callable[[], None]]:
        array = self._call(f"cuMemHostAlloc({nbytes})", self.drv.pagelocked_empty, nbytes, np.uint8)
        return array, lambda: self._call("cuMemFreeHost", array.base.free)

    def stream_create(self) -> tuple[Any, int]:
        stream = self._call("cuStreamCreate", self.drv.Stream)
        return stream, int(stream.handle)

    def stream_sync(self, stream: Any) -> None:
        self._call("cuStreamSynchronize", stream.synchronize)

    def stream_destroy(self, stream: Any) -> None:
        return None  # pycuda destroys a stream when the object is collected

    def event_create(self) -> Any:
        return self._call("cuEventCreate", self.drv.Event)

    def event_record(self, event: Any, stream: Any) -> None:
        self._call("cuEventRecord", event.record, stream)

    def event_elapsed(self, start: Any, end: Any) -> float:
        self._call("cuEventSynchronize", end.synchronize)
        return float(self._call("cuEventElapsedTime", end.time_since, start))

    def event_destroy(self, event: Any) -> None:
        return None

    def htod_async(self, dst: int, src: PinnedBuffer, nbytes: int, stream: Any) -> None:
        self._call("cuMemcpyHtoDAsync", self.drv.memcpy_htod_async, dst, src.array[:nbytes], stream)

    def dtoh_async(self, dst: PinnedBuffer, src: int, nbytes: int, stream: Any) -> None:
        self._call("cuMemcpyDtoHAsync", self.drv.memcpy_dtoh_async, dst.array[:nbytes], src, stream)
