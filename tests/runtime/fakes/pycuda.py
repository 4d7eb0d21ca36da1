"""A fake ``pycuda.driver`` over a :class:`FakeDevice`, with the driver API's context *stack per thread*:
calls that need a context fail with ``Error`` when the calling thread has none current, and
:func:`leftover_contexts` reports the threads whose stack is not empty, which real pycuda treats as a
fatal error when it cleans up at interpreter exit."""

from __future__ import annotations

import threading
import types
from typing import Any

import numpy as np

from .device import FakeDevice


def make_pycuda(gpu: FakeDevice, *, devices: int = 1) -> types.ModuleType:
    drv = types.ModuleType("pycuda.driver")
    stacks: dict[int, list[Context]] = {}  # thread id -> context stack (kept after the thread ends)
    lock = threading.Lock()
    clock = [0.0]  # advances as queued events run

    class Error(Exception):
        pass

    def stack() -> list[Context]:
        with lock:
            return stacks.setdefault(threading.get_ident(), [])

    def need_context(call: str) -> None:
        if not stack():
            raise Error(f"{call} failed: invalid device context")

    class Context:
        def __init__(self, device: int) -> None:
            self.device = device

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Context) and other.device == self.device

        def __hash__(self) -> int:
            return self.device

        def push(self) -> None:
            stack().append(self)

        @staticmethod
        def pop() -> None:
            if not stack():
                raise Error("cuCtxPopCurrent failed: invalid context")
            stack().pop()

        @staticmethod
        def get_current() -> Context | None:
            s = stack()
            return s[-1] if s else None

        def detach(self) -> None:
            return None

    class Device:
        def __init__(self, index: int) -> None:
            if not 0 <= index < devices:
                raise Error(f"cuDeviceGet failed: invalid device ordinal {index}")
            self.index = index

        @staticmethod
        def count() -> int:
            return devices

        def name(self) -> str:
            return gpu.name

        def compute_capability(self) -> tuple[int, int]:
            return gpu.capability

        def total_memory(self) -> int:
            return gpu.total_memory

        def retain_primary_context(self) -> Context:
            return Context(self.index)

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            need_context("cuMemAlloc")
            self.ptr = gpu.malloc(nbytes)

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            need_context("cuMemFree")
            if self.ptr:
                gpu.free(self.ptr)
                self.ptr = 0

    class HostAllocation:
        """What ``pagelocked_empty(...).base`` is: page-locked memory with ``free()``."""

        def __init__(self, nbytes: int, dtype: Any) -> None:
            self.ptr = gpu.malloc_host(nbytes * np.dtype(dtype).itemsize)
            self.__array_interface__ = {
                "shape": (nbytes,), "typestr": np.dtype(dtype).str, "data": (self.ptr, False), "version": 3,
            }

        def free(self) -> None:
            need_context("cuMemFreeHost")
            gpu.free_host(self.ptr)

    class Stream:
        def __init__(self) -> None:
            need_context("cuStreamCreate")
            self.handle = gpu.stream_create()

        def synchronize(self) -> None:
            need_context("cuStreamSynchronize")
            gpu.synchronize(self.handle)

    class Event:
        def __init__(self) -> None:
            need_context("cuEventCreate")
            self.done_at: float | None = None

        def record(self, stream: Stream) -> None:
            self.done_at = None

            def run() -> None:
                clock[0] += 0.25
                self.done_at = clock[0]

            gpu.enqueue(stream.handle, "event record", run)

        def synchronize(self) -> None:
            if self.done_at is None:
                raise Error("cuEventSynchronize: event not recorded or its stream not run")

        def time_since(self, start: Event) -> float:
            if start.done_at is None or self.done_at is None:
                raise Error("cuEventElapsedTime failed: not ready")
            return self.done_at - start.done_at

    def pagelocked_empty(nbytes: int, dtype: Any) -> np.ndarray:
        need_context("cuMemHostAlloc")
        return np.asarray(HostAllocation(nbytes, dtype))

    def memcpy_htod_async(dst: int, src: np.ndarray, stream: Stream) -> None:
        need_context("cuMemcpyHtoDAsync")
        host = int(src.ctypes.data)
        gpu.enqueue(stream.handle, "copy host->device", lambda: gpu.copy(int(dst), host, src.nbytes), uses=(int(dst), host))

    def memcpy_dtoh_async(dst: np.ndarray, src: int, stream: Stream) -> None:
        need_context("cuMemcpyDtoHAsync")
        host = int(dst.ctypes.data)
        gpu.enqueue(stream.handle, "copy device->host", lambda: gpu.copy(host, int(src), dst.nbytes), uses=(host, int(src)))

    drv.Error, drv.Context, drv.Device = Error, Context, Device  # type: ignore[attr-defined]
    drv.Stream, drv.Event = Stream, Event  # type: ignore[attr-defined]
    drv.init = lambda: None  # type: ignore[attr-defined]
    drv.mem_alloc = DeviceAllocation  # type: ignore[attr-defined]
    drv.pagelocked_empty = pagelocked_empty  # type: ignore[attr-defined]
    drv.memcpy_htod_async, drv.memcpy_dtoh_async = memcpy_htod_async, memcpy_dtoh_async  # type: ignore[attr-defined]
    drv.has_context = lambda: bool(stack())  # type: ignore[attr-defined]
    drv.leftover_contexts = lambda: {t: len(s) for t, s in stacks.items() if s}  # type: ignore[attr-defined]
    return drv
