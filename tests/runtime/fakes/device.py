"""A fake GPU: device memory, pinned host memory at real addresses, and streams whose queued work runs
only when the stream (or an event on it) is synchronized, as asynchronous CUDA work may."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Op:
    what: str
    run: Callable[[], None]
    uses: tuple[int, ...]  # device or pinned addresses the op reads or writes


@dataclass
class FakeDevice:
    name: str = "Fake GPU"
    capability: tuple[int, int] = (8, 9)
    total_memory: int = 1 << 30
    memory: dict[int, np.ndarray] = field(default_factory=dict)  # device address -> bytes
    pinned: dict[int, np.ndarray] = field(default_factory=dict)  # host address -> bytes
    streams: dict[int, list[Op]] = field(default_factory=dict)  # stream handle -> queued work
    violations: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)  # call name -> error code to return once

    def __post_init__(self) -> None:
        self._addresses = itertools.count(0x7F0000000000, 0x100000)
        self._handles = itertools.count(0x5000)
        self._lock = threading.Lock()

    # memory
    def malloc(self, nbytes: int) -> int:
        ptr = next(self._addresses)
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def free(self, ptr: int) -> None:
        self._check_idle(ptr, "device free")
        del self.memory[ptr]

    def malloc_host(self, nbytes: int) -> int:
        buf = np.zeros(nbytes, np.uint8)
        ptr = int(buf.ctypes.data)
        self.pinned[ptr] = buf
        return ptr

    def free_host(self, ptr: int) -> None:
        self._check_idle(ptr, "pinned free")
        del self.pinned[ptr]

    def _check_idle(self, ptr: int, what: str) -> None:
        for handle, ops in self.streams.items():
            for op in ops:
                if ptr in op.uses:
                    self.violations.append(f"{what} of {ptr:#x} while {op.what} is queued on stream "
                                           f"{handle:#x}")

    # streams
    def stream_create(self) -> int:
        handle = next(self._handles)
        self.streams[handle] = []
        return handle

    def stream_destroy(self, handle: int) -> None:
        if self.streams.get(handle):
            self.violations.append(f"stream {handle:#x} destroyed with work queued")
        self.streams.pop(handle, None)

    def enqueue(self, handle: int, what: str, run: Callable[[], None], uses: tuple[int, ...] = ()) -> None:
        if handle not in self.streams:
            raise KeyError(f"unknown stream {handle:#x}")
        self.streams[handle].append(Op(what, run, uses))
        self.log.append(what)

    def synchronize(self, handle: int) -> None:
        ops, self.streams[handle] = self.streams[handle], []
        for op in ops:
            op.run()

    def pending(self) -> int:
        return sum(len(ops) for ops in self.streams.values())

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        """Queue-time checks happen in the binding; this runs the copy between whatever memories hold the
        addresses."""
        self._view(dst, nbytes)[:] = self._view(src, nbytes)

    def _view(self, ptr: int, nbytes: int) -> np.ndarray:
        for space in (self.memory, self.pinned):
            if ptr in space:
                if nbytes > space[ptr].size:
                    raise ValueError(f"copy of {nbytes} bytes overruns {ptr:#x} ({space[ptr].size} bytes)")
                return space[ptr][:nbytes]
        raise ValueError(f"{ptr:#x} is not allocated (freed before queued work ran?)")

    def take_failure(self, call: str) -> int | None:
        return self.fail.pop(call, None)


def host_address(array: Any) -> int:
    return int(np.asarray(array).ctypes.data)
