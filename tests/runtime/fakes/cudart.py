"""A fake ``cuda.bindings.runtime`` over a :class:`FakeDevice`: every call returns ``(cudaError_t, *values)``
and never raises, copies and event records are queued on their stream, and ``int()`` on a handle object
warns as deprecated (cuda-bindings 12.9+; ``cuda.bindings.utils.get_cuda_native_handle`` replaces it)."""

from __future__ import annotations

import enum
import threading
import types
import warnings
from typing import Any

from .device import FakeDevice


class cudaError_t(enum.IntEnum):  # noqa: N801 - the binding's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class _Handle:
    def __init__(self, value: int) -> None:
        self._value = value

    def __int__(self) -> int:
        warnings.warn("int(cuda_obj) is deprecated; use cuda.bindings.utils.get_cuda_native_handle", DeprecationWarning,
                      stacklevel=2)
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Handle) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class cudaStream_t(_Handle):  # noqa: N801
    pass


class cudaEvent_t(_Handle):  # noqa: N801
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.done_at: float | None = None


def make_cuda_utils() -> types.ModuleType:
    """``cuda.bindings.utils`` with ``get_cuda_native_handle`` (it rejects plain ints, as the real one does)."""
    utils = types.ModuleType("cuda.bindings.utils")

    def get_cuda_native_handle(obj: Any) -> int:
        if not isinstance(obj, _Handle):
            raise TypeError(f"Unknown type: {type(obj)}")
        return obj._value

    utils.get_cuda_native_handle = get_cuda_native_handle  # type: ignore[attr-defined]
    return utils


def make_cudart(gpu: FakeDevice, *, devices: int = 1, runtime: int = 12080, driver: int = 12080) -> types.ModuleType:
    """``runtime``/``driver`` are CUDA versions as the API encodes them (12.8 -> 12080; driver 0: none loaded).

    As in CUDA, a runtime whose major version is newer than the driver's (or no driver at all) makes
    device calls return cudaErrorInsufficientDriver.
    """
    rt = types.ModuleType("cuda.bindings.runtime")
    ok = cudaError_t.cudaSuccess
    rt.cudaError_t, rt.cudaMemcpyKind = cudaError_t, cudaMemcpyKind  # type: ignore[attr-defined]
    rt.cudaStream_t, rt.cudaEvent_t = cudaStream_t, cudaEvent_t  # type: ignore[attr-defined]
    rt.cudaStreamNonBlocking = 1  # type: ignore[attr-defined]
    rt.current = {}  # type: ignore[attr-defined]  # thread id -> device set by cudaSetDevice
    clock = [0.0]

    def guard(call: str) -> cudaError_t | None:
        if not driver or driver // 1000 < runtime // 1000:
            return cudaError_t.cudaErrorInsufficientDriver
        if (code := gpu.take_failure(call)) is not None:
            return cudaError_t(code)
        return None

    def handle(stream: Any) -> int:
        return stream._value if isinstance(stream, _Handle) else int(stream)

    def cudaGetErrorName(err: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
        return ok, cudaError_t(err).name.encode()

    def cudaGetErrorString(err: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
        return ok, {2: b"out of memory", 35: b"CUDA driver version is insufficient for CUDA runtime version"}.get(
            int(err), b"fake error")

    def cudaRuntimeGetVersion() -> tuple[cudaError_t, int]:  # noqa: N802
        return ok, runtime

    def cudaDriverGetVersion() -> tuple[cudaError_t, int]:  # noqa: N802
        return ok, driver

    def cudaGetDeviceCount() -> tuple[cudaError_t, int | None]:  # noqa: N802
        if (err := guard("cudaGetDeviceCount")) is not None:
            return err, None
        return (ok, devices) if devices else (cudaError_t.cudaErrorNoDevice, None)

    def cudaGetDeviceProperties(index: int) -> tuple[cudaError_t, Any]:  # noqa: N802
        if (err := guard("cudaGetDeviceProperties")) is not None or not 0 <= index < devices:
            return err or cudaError_t.cudaErrorInvalidDevice, None
        major, minor = gpu.capability
        name = gpu.name.encode() + b"\x00" * 8  # the binding returns the fixed-size C char array
        return ok, types.SimpleNamespace(name=name, major=major, minor=minor, totalGlobalMem=gpu.total_memory)

    def cudaSetDevice(index: int) -> tuple[cudaError_t]:  # noqa: N802
        if (err := guard("cudaSetDevice")) is not None or not 0 <= index < devices:
            return (err or cudaError_t.cudaErrorInvalidDevice,)
        rt.current[threading.get_ident()] = index  # type: ignore[attr-defined]
        return (ok,)

    def cudaMalloc(nbytes: int) -> tuple[cudaError_t, int]:  # noqa: N802
        if (err := guard("cudaMalloc")) is not None:
            return err, 0
        return ok, gpu.malloc(nbytes)

    def cudaFree(ptr: int) -> tuple[cudaError_t]:  # noqa: N802
        if ptr not in gpu.memory:
            return (cudaError_t.cudaErrorInvalidValue,)
        gpu.free(ptr)
        return (ok,)

    def cudaMallocHost(nbytes: int) -> tuple[cudaError_t, int]:  # noqa: N802
        if (err := guard("cudaMallocHost")) is not None:
            return err, 0
        return ok, gpu.malloc_host(nbytes)

    def cudaFreeHost(ptr: int) -> tuple[cudaError_t]:  # noqa: N802
        if ptr not in gpu.pinned:
            return (cudaError_t.cudaErrorInvalidValue,)
        gpu.free_host(ptr)
        return (ok,)

    def cudaStreamCreateWithFlags(flags: int) -> tuple[cudaError_t, cudaStream_t | None]:  # noqa: N802
        if (err := guard("cudaStreamCreate")) is not None:
            return err, None
        return ok, cudaStream_t(gpu.stream_create())

    def cudaStreamSynchronize(stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        if handle(stream) not in gpu.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        gpu.synchronize(handle(stream))
        return (guard("cudaStreamSynchronize") or ok,)

    def cudaStreamDestroy(stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        gpu.stream_destroy(handle(stream))
        return (ok,)

    def cudaEventCreate() -> tuple[cudaError_t, cudaEvent_t]:  # noqa: N802
        return ok, cudaEvent_t(id(object()))

    def cudaEventRecord(event: cudaEvent_t, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        event.done_at = None

        def run() -> None:
            clock[0] += 0.25
            event.done_at = clock[0]

        gpu.enqueue(handle(stream), "event record", run)
        return (ok,)

    def cudaEventElapsedTime(start: cudaEvent_t, end: cudaEvent_t) -> tuple[cudaError_t, float | None]:  # noqa: N802
        if start.done_at is None or end.done_at is None:
            return cudaError_t.cudaErrorNotReady, None
        return ok, end.done_at - start.done_at

    def cudaEventDestroy(event: cudaEvent_t) -> tuple[cudaError_t]:  # noqa: N802
        return (ok,)

    def cudaMemcpyAsync(dst: int, src: int, nbytes: int, kind: cudaMemcpyKind, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        if (err := guard("cudaMemcpyAsync")) is not None:
            return (err,)
        spaces = {cudaMemcpyKind.cudaMemcpyHostToDevice: (gpu.memory, gpu.pinned),
                  cudaMemcpyKind.cudaMemcpyDeviceToHost: (gpu.pinned, gpu.memory)}
        dst_space, src_space = spaces[cudaMemcpyKind(kind)]
        if dst not in dst_space or src not in src_space:
            return (cudaError_t.cudaErrorInvalidValue,)
        what = "copy host->device" if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else "copy device->host"
        gpu.enqueue(handle(stream), what, lambda: gpu.copy(dst, src, nbytes), uses=(dst, src))
        return (ok,)

    for fn in (cudaGetErrorName, cudaGetErrorString, cudaRuntimeGetVersion, cudaDriverGetVersion, cudaGetDeviceCount,
               cudaGetDeviceProperties, cudaSetDevice, cudaMalloc, cudaFree, cudaMallocHost, cudaFreeHost,
               cudaStreamCreateWithFlags, cudaStreamSynchronize, cudaStreamDestroy, cudaEventCreate, cudaEventRecord,
               cudaEventElapsedTime, cudaEventDestroy, cudaMemcpyAsync):
        setattr(rt, fn.__name__, fn)
    return rt
