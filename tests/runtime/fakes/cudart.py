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
        warnings.warn("int(cuda_obj) is deprecated; use cuda.bindings.utils.get_cuda_native_handle",
                      DeprecationWarning,
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
    """``cuda.bindings.utils`` with ``get_cuda_native_handle`` (it rejects plain ints, as the real one
    does)."""
    utils = types.ModuleType("cuda.bindings.utils")

    def get_cuda_native_handle(obj: Any) -> int:
        if not isinstance(obj, _Handle):
            raise TypeError(f"Unknown type: {type(obj)}")
        return obj._value

    utils.get_cuda_native_handle = get_cuda_native_handle  # type: ignore[attr-defined]
    return utils


class _Runtime:
    """One fake module's calls, over its device; each returns ``(cudaError_t, *values)``."""

    ok = cudaError_t.cudaSuccess

    def __init__(self, gpu: FakeDevice, devices: int, runtime: int, driver: int) -> None:
        self.gpu, self.devices, self.runtime, self.driver = gpu, devices, runtime, driver
        self.current: dict[int, int] = {}  # thread id -> device set by cudaSetDevice
        self.clock = 0.0

    def guard(self, call: str) -> cudaError_t | None:
        if not self.driver or self.driver // 1000 < self.runtime // 1000:
            return cudaError_t.cudaErrorInsufficientDriver
        if (code := self.gpu.take_failure(call)) is not None:
            return cudaError_t(code)
        return None

    @staticmethod
    def handle(stream: Any) -> int:
        return stream._value if isinstance(stream, _Handle) else int(stream)

    def cudaGetErrorName(self, err: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
        return self.ok, cudaError_t(err).name.encode()

    def cudaGetErrorString(self, err: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
        return self.ok, {2: b"out of memory",
                         35: b"CUDA driver version is insufficient for CUDA runtime version"}.get(
            int(err), b"fake error")

    def cudaRuntimeGetVersion(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return self.ok, self.runtime

    def cudaDriverGetVersion(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return self.ok, self.driver

    def cudaGetDeviceCount(self) -> tuple[cudaError_t, int | None]:  # noqa: N802
        if (err := self.guard("cudaGetDeviceCount")) is not None:
            return err, None
        return (self.ok, self.devices) if self.devices else (cudaError_t.cudaErrorNoDevice, None)

    def cudaGetDeviceProperties(self, index: int) -> tuple[cudaError_t, Any]:  # noqa: N802
        if (err := self.guard("cudaGetDeviceProperties")) is not None or not 0 <= index < self.devices:
            return err or cudaError_t.cudaErrorInvalidDevice, None
        gpu = self.gpu
        major, minor = gpu.capability
        name = gpu.name.encode() + b"\x00" * 8  # the binding returns the fixed-size C char array
        return self.ok, types.SimpleNamespace(name=name, major=major, minor=minor,
                                              totalGlobalMem=gpu.total_memory)

    def cudaSetDevice(self, index: int) -> tuple[cudaError_t]:  # noqa: N802
        if (err := self.guard("cudaSetDevice")) is not None or not 0 <= index < self.devices:
            return (err or cudaError_t.cudaErrorInvalidDevice,)
        self.current[threading.get_ident()] = index
        return (self.ok,)

    def cudaMalloc(self, nbytes: int) -> tuple[cudaError_t, int]:  # noqa: N802
        if (err := self.guard("cudaMalloc")) is not None:
            return err, 0
        return self.ok, self.gpu.malloc(nbytes)

    def cudaFree(self, ptr: int) -> tuple[cudaError_t]:  # noqa: N802
        if ptr not in self.gpu.memory:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.gpu.free(ptr)
        return (self.ok,)

    def cudaMallocHost(self, nbytes: int) -> tuple[cudaError_t, int]:  # noqa: N802
        if (err := self.guard("cudaMallocHost")) is not None:
            return err, 0
        return self.ok, self.gpu.malloc_host(nbytes)

    def cudaFreeHost(self, ptr: int) -> tuple[cudaError_t]:  # noqa: N802
        if ptr not in self.gpu.pinned:
            return (cudaError_t.cudaErrorInvalidValue,)
        self.gpu.free_host(ptr)
        return (self.ok,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, cudaStream_t | None]:  # noqa: N802
        if (err := self.guard("cudaStreamCreate")) is not None:
            return err, None
        return self.ok, cudaStream_t(self.gpu.stream_create())

    def cudaStreamSynchronize(self, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        if self.handle(stream) not in self.gpu.streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self.gpu.synchronize(self.handle(stream))
        return (self.guard("cudaStreamSynchronize") or self.ok,)

    def cudaStreamDestroy(self, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        self.gpu.stream_destroy(self.handle(stream))
        return (self.ok,)

    def cudaEventCreate(self) -> tuple[cudaError_t, cudaEvent_t]:  # noqa: N802
        return self.ok, cudaEvent_t(id(object()))

    def cudaEventRecord(self, event: cudaEvent_t, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        event.done_at = None

        def run() -> None:
            self.clock += 0.25
            event.done_at = self.clock

        self.gpu.enqueue(self.handle(stream), "event record", run)
        return (self.ok,)

    def cudaEventElapsedTime(self, start: cudaEvent_t, end: cudaEvent_t) -> tuple[cudaError_t, float | None]:  # noqa: N802
        if start.done_at is None or end.done_at is None:
            return cudaError_t.cudaErrorNotReady, None
        return self.ok, end.done_at - start.done_at

    def cudaEventDestroy(self, event: cudaEvent_t) -> tuple[cudaError_t]:  # noqa: N802
        return (self.ok,)

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: cudaMemcpyKind,  # noqa: N802
                        stream: Any) -> tuple[cudaError_t]:
        if (err := self.guard("cudaMemcpyAsync")) is not None:
            return (err,)
        gpu = self.gpu
        spaces = {cudaMemcpyKind.cudaMemcpyHostToDevice: (gpu.memory, gpu.pinned),
                  cudaMemcpyKind.cudaMemcpyDeviceToHost: (gpu.pinned, gpu.memory)}
        dst_space, src_space = spaces[cudaMemcpyKind(kind)]
        if dst not in dst_space or src not in src_space:
            return (cudaError_t.cudaErrorInvalidValue,)
        what = "copy host->device" if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else "copy device->host"
        gpu.enqueue(self.handle(stream), what, lambda: gpu.copy(dst, src, nbytes), uses=(dst, src))
        return (self.ok,)


def make_cudart(gpu: FakeDevice, *, devices: int = 1, runtime: int = 12080,
                driver: int = 12080) -> types.ModuleType:
    """``runtime``/``driver`` are CUDA versions as the API encodes them (12.8 -> 12080; driver 0: none
    loaded).

    As in CUDA, a runtime whose major version is newer than the driver's (or no driver at all) makes
    device calls return cudaErrorInsufficientDriver.
    """
    rt = types.ModuleType("cuda.bindings.runtime")
    calls = _Runtime(gpu, devices, runtime, driver)
    rt.cudaError_t, rt.cudaMemcpyKind = cudaError_t, cudaMemcpyKind  # type: ignore[attr-defined]
    rt.cudaStream_t, rt.cudaEvent_t = cudaStream_t, cudaEvent_t  # type: ignore[attr-defined]
    rt.cudaStreamNonBlocking = 1  # type: ignore[attr-defined]
    rt.current = calls.current  # type: ignore[attr-defined]  # thread id -> device set by cudaSetDevice
    for name in dir(_Runtime):
        if name.startswith("cuda"):
            setattr(rt, name, getattr(calls, name))
    return rt
