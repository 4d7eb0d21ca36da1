"""Helpers of the batching tests: a fake clock and a queue whose timed gets advance it instead of
sleeping, pending requests, images, and a way to hold the worker busy."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np

from kiln.serve.batcher import (
    Batcher,
    Pending,
)
from tests.polling import eventually

from .conftest import FakeBackend


class FakeClock:
    """A clock that moves only when a blocking queue.get would have waited (via FakeQueue)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeQueue(queue.Queue):  # type: ignore[type-arg]
    """A Queue whose timed get advances the fake clock instead of sleeping, and records the timeouts."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None) -> Pending:
        if block:
            self.waits.append(timeout)
        try:
            return super().get(block=False)
        except queue.Empty:
            if block and timeout is None:
                raise AssertionError("collect blocked without a timeout on an empty queue") from None
            if timeout:
                self.clock.now += timeout
            raise


def item(size: int = 1, enqueued: float = 100.0, deadline: float | None = None, rid: str = "") -> Pending:
    return Pending({"x": np.zeros((size, 2), np.float32)}, size, request_id=rid, enqueued=enqueued,
                   deadline=deadline)


def feeds(n: int, value: float = 0.0) -> dict[str, np.ndarray]:
    return {"images": np.full((n, 1, 28, 28), value, np.float32)}


def occupy(batcher: Batcher, backend: FakeBackend) -> Future[dict[str, np.ndarray]]:
    """Hold the backend busy on one request (until ``backend.gate`` is set); returns that request."""
    backend.gate = threading.Event()
    backend.calls.clear()
    busy = batcher.submit(feeds(1))
    assert eventually(lambda: bool(backend.calls))
    return busy
