"""A fake ``pycuda.driver`` over a :class:`FakeDevice`, with the driver API's context *stack per thread*:
calls that need a context fail with ``Error`` when the calling thread has none current, and
:func:`leftover_contexts` reports the threads whose stack is not empty, which real pycuda treats as a
fatal error when it cleans up at interpreter exit.

The classes below read the state of the one fake module they belong to through ``st`` (a
:class:`_Driver`), which :func:`make_pycuda` binds into a subclass of each."""

from __future__ import annotations

import threading
import types
from typing import Any

import numpy as np

from .device import FakeDevice


class _Driver:
    """One fake module's state: the device, the context stacks per thread, the event clock, ``Error``."""

    def __init__(self, gpu: FakeDevice, devices: int) -> None:
        self.gpu, self.devices = gpu, devices
        self.stacks: dict[int, list[_Context]] = {}  # thread id -> context stack (kept after the thread ends)
        self.lock = threading.Lock()
        self.clock = 0.0  # advances as queued events run
        self.Error = type("Error", (Exception,), {})

    def stack(self) -> list[_Context]:
        with self.lock:
            return self.stacks.setdefault(threading.get_ident(), [])

    def need_context(self, call: str) -> None:
        if not self.stack():
            raise self.Error(f"{call} failed: invalid device context")


class _Context:
    st: _Driver

    def __init__(self, device: int) -> None:
        self.device = device

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Context) and other.device == self.device

    def __hash__(self) -> int:
        return self.device

    def push(self) -> None:
        self.st.stack().append(self)

    @classmethod
    def pop(cls) -> None:
        if not cls.st.stack():
            raise cls.st.Error("cuCtxPopCurrent failed: invalid context")
        cls.st.stack().pop()

    @classmethod
    def get_current(cls) -> _Context | None:
        s = cls.st.stack()
        return s[-1] if s else None

    def detach(self) -> None:
        return None


class _Device:
    st: _Driver
    context: type[_Context]

    def __init__(self, index: int) -> None:
        if not 0 <= index < self.st.devices:
            raise self.st.Error(f"cuDeviceGet failed: invalid device ordinal {index}")
        self.index = index

    @classmethod
    def count(cls) -> int:
        return cls.st.devices

    def name(self) -> str:
        return self.st.gpu.name

    def compute_capability(self) -> tuple[int, int]:
        return self.st.gpu.capability

    def total_memory(self) -> int:
        return self.st.gpu.total_memory

    def retain_primary_context(self) -> _Context:
        return self.context(self.index)


class _DeviceAllocation:
    st: _Driver

    def __init__(self, nbytes: int) -> None:
        self.st.need_context("cuMemAlloc")
        self.ptr = self.st.gpu.malloc(nbytes)

    def __int__(self) -> int:
        return self.ptr

    def free(self) -> None:
        self.st.need_context("cuMemFree")
        if self.ptr:
            self.st.gpu.free(self.ptr)
            self.ptr = 0


class _HostAllocation:
    """What ``pagelocked_empty(...).base`` is: page-locked memory with ``free()``."""

    st: _Driver

    def __init__(self, nbytes: int, dtype: Any) -> None:
        self.ptr = self.st.gpu.malloc_host(nbytes * np.dtype(dtype).itemsize)
        self.__array_interface__ = {
            "shape": (nbytes,), "typestr": np.dtype(dtype).str, "data": (self.ptr, False), "version": 3,
        }

    def free(self) -> None:
        self.st.need_context("cuMemFreeHost")
        self.st.gpu.free_host(self.ptr)


class _Stream:
    st: _Driver

    def __init__(self) -> None:
        self.st.need_context("cuStreamCreate")
        self.handle = self.st.gpu.stream_create()

    def synchronize(self) -> None:
        self.st.need_context("cuStreamSynchronize")
        self.st.gpu.synchronize(self.handle)


class _Event:
    st: _Driver

    def __init__(self) -> None:
        self.st.need_context("cuEventCreate")
        self.done_at: float | None = None

    def record(self, stream: _Stream) -> None:
        self.done_at = None

        def run() -> None:
            self.st.clock += 0.25
            self.done_at = self.st.clock

        self.st.gpu.enqueue(stream.handle, "event record", run)

    def synchronize(self) -> None:
        if self.done_at is None:
            raise self.st.Error("cuEventSynchronize: event not recorded or its stream not run")

    def time_since(self, start: _Event) -> float:
        if start.done_at is None or self.done_at is None:
            raise self.st.Error("cuEventElapsedTime failed: not ready")
        return self.done_at - start.done_at


def _copies(st: _Driver, host_allocation: type[_HostAllocation]) -> dict[str, Any]:
    """``pagelocked_empty`` and the two asynchronous copies, each checking for a current context."""
    gpu = st.gpu

    def pagelocked_empty(nbytes: int, dtype: Any) -> np.ndarray:
        st.need_context("cuMemHostAlloc")
        return np.asarray(host_allocation(nbytes, dtype))

    def memcpy_htod_async(dst: int, src: np.ndarray, stream: _Stream) -> None:
        st.need_context("cuMemcpyHtoDAsync")
        host = int(src.ctypes.data)
        gpu.enqueue(stream.handle, "copy host->device", lambda: gpu.copy(int(dst), host, src.nbytes),
                    uses=(int(dst), host))

    def memcpy_dtoh_async(dst: np.ndarray, src: int, stream: _Stream) -> None:
        st.need_context("cuMemcpyDtoHAsync")
        host = int(dst.ctypes.data)
        gpu.enqueue(stream.handle, "copy device->host", lambda: gpu.copy(host, int(src), dst.nbytes),
                    uses=(host, int(src)))

    return {"pagelocked_empty": pagelocked_empty, "memcpy_htod_async": memcpy_htod_async,
            "memcpy_dtoh_async": memcpy_dtoh_async}


def make_pycuda(gpu: FakeDevice, *, devices: int = 1) -> types.ModuleType:
    drv = types.ModuleType("pycuda.driver")
    st = _Driver(gpu, devices)

    def bind(cls: type, **more: Any) -> Any:  # this module's class: the shared one reading this state
        return type(cls.__name__.lstrip("_"), (cls,), {"st": st, "__module__": "pycuda.driver", **more})

    context = bind(_Context)
    host_allocation = bind(_HostAllocation)
    drv.Error, drv.Context, drv.Device = st.Error, context, bind(_Device, context=context)  # type: ignore[attr-defined]
    drv.Stream, drv.Event = bind(_Stream), bind(_Event)  # type: ignore[attr-defined]
    drv.init = lambda: None  # type: ignore[attr-defined]
    drv.mem_alloc = bind(_DeviceAllocation)  # type: ignore[attr-defined]
    for name, fn in _copies(st, host_allocation).items():
        setattr(drv, name, fn)
    drv.has_context = lambda: bool(st.stack())  # type: ignore[attr-defined]
    drv.leftover_contexts = lambda: {t: len(s) for t, s in st.stacks.items() if s}  # type: ignore[attr-defined]
    return drv
