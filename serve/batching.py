"""The pure core of dynamic batching: the request record, the queue and :func:`collect`, which forms
one batch. No threads are started here and time comes from an injectable clock, so every timer edge is
tested with a fake clock (tests/serve/test_batch_collect.py); :mod:`kiln.serve.batcher` runs it in a worker.

The policy never costs throughput: a batch takes what is already queued (requests that arrived while
the backend was busy with the previous batch) and waits for more only while requests are known to be
on their way (being read and decoded), at most ``max_delay`` after its first request was queued. A
lone request on an idle backend runs at once.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.errors import InputError, KilnError

Feeds = dict[str, np.ndarray]
Clock = Callable[[], float]


class QueueFull(KilnError):
    """The model's queue is full: the client should retry later (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(KilnError, TimeoutError):
    """The request did not get its result before its deadline (HTTP 504)."""


class BatcherClosed(KilnError):
    """The batcher is shutting down or stopped; no new requests are taken (HTTP 503)."""


class ModelNotReady(KilnError):
    """The backend is still loading, or failed to load (HTTP 503)."""


class ClientDisconnected(KilnError):
    """The client went away while its request waited; the request was cancelled."""


class InferenceFailed(KilnError):
    """The backend raised while running the batch that held this request (HTTP 500)."""

    def __init__(self, message: str, request_id: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class BatchFuture(Future):
    """A request's future. ``waiter`` is set by an asyncio caller (:func:`kiln.serve.batcher.wait_result`)
    so the worker can wake the event loop once per batch instead of once per request. An error (rare)
    wakes its waiter at once."""

    waiter: Any = None

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        if self.waiter is not None:
            self.waiter.notify()


@dataclass(eq=False)
class Pending:
    """One queued request (or one part of a split request). ``size`` items along the batch axis."""

    feeds: Feeds
    size: int
    future: Future[Feeds] = field(default_factory=BatchFuture)
    request_id: str = ""
    enqueued: float = 0.0
    deadline: float | None = None


class WakeableQueue(queue.Queue):
    """A bounded queue whose waiting :meth:`get` :meth:`wake` ends early (``queue.Empty``) without an
    item: the worker waiting for announced requests re-checks at once when the last one was refused or
    submitted, instead of sleeping out ``max_delay``."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._wakes = 0
        self._listening = 0  # waits in progress that a wake ends

    def wake(self) -> None:
        """End the wakeable :meth:`get` in progress, if any. Other waits (for a first request) are left
        asleep: waking a thread that has nothing to do costs a context switch per request."""
        with self.not_empty:
            self._wakes += 1
            if self._listening:
                self.not_empty.notify_all()

    def get(self, block: bool = True, timeout: float | None = None, wakeable: bool = True) -> Any:
        if not block or (timeout is not None and timeout <= 0):
            return super().get(block=False)
        with self.not_empty:
            wakes = self._wakes
            end = None if timeout is None else time.monotonic() + timeout
            self._listening += wakeable
            try:
                while not self._qsize():
                    left = None if end is None else end - time.monotonic()
                    if (wakeable and self._wakes != wakes) or (left is not None and left <= 0):
                        raise queue.Empty
                    self.not_empty.wait(left)
            finally:
                self._listening -= wakeable
            item = self._get()
            self.not_full.notify()
            return item


def take(q: queue.Queue[Pending], timeout: float | None, wakeable: bool = True) -> Pending | None:
    """``None`` blocks, ``<= 0`` only takes what is already queued. ``wakeable=False``: a
    :meth:`WakeableQueue.wake` does not end the wait."""
    try:
        if timeout is not None and timeout <= 0:
            return q.get_nowait()
        if isinstance(q, WakeableQueue):
            return q.get(timeout=timeout, wakeable=wakeable)
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


def _remaining(until: float | None, clock: Clock) -> float | None:
    return None if until is None else until - clock()


def claim(item: Pending, clock: Clock = time.monotonic) -> bool:
    """Mark ``item`` running; False (and the item is dropped) if it was cancelled or its deadline passed."""
    if item.deadline is not None and clock() >= item.deadline:
        if item.future.set_running_or_notify_cancel():
            item.future.set_exception(RequestTimeout(f"request {item.request_id} waited past its deadline"))
        return False
    return item.future.set_running_or_notify_cancel()


def collect(
    q: queue.Queue[Pending],
    max_items: int,
    max_delay: float | None,
    first_timeout: float | None = None,
    carry: Pending | None = None,
    clock: Clock = time.monotonic,
    more_coming: Callable[[], bool] | None = None,
) -> tuple[list[Pending], Pending | None]:
    """Take one batch from ``q``: claimed requests holding at most ``max_items`` items in total.

    ``first_timeout``: how long to wait for a first request (``None`` blocks, ``0`` does not wait).
    ``max_delay``: how long after the first request was queued the batch stays open for more
    (``None``: until it is full; ``0``: only what is queued now). ``carry`` is a claimed request left
    over from the previous call; it opens this batch. Returns ``(batch, carry)`` where ``carry`` is a
    claimed request that did not fit and must open the next batch. An empty batch means the first
    wait timed out.

    ``more_coming()`` tells whether any request is on its way (accepted by the server, not queued
    yet). Whatever is queued joins the batch without a wait; once the queue is empty the batch closes
    at once unless a request is on its way, so a lone request pays no batching delay and a batch
    formed while the backend was busy (its first request queued longer than ``max_delay`` ago) does
    not wait either. A wait that ends without an item (:meth:`WakeableQueue.wake`) re-checks.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    first = carry
    if first is None:
        until = None if first_timeout is None else clock() + first_timeout
        while first is None:
            item = take(q, _remaining(until, clock), wakeable=False)  # a submit's put wakes this wait
            if item is None:
                return [], None
            if claim(item, clock):
                first = item
    batch, size = [first], first.size
    close_at = None if max_delay is None else first.enqueued + max_delay
    while size < max_items:
        item = take(q, 0)
        while item is None:
            left = _remaining(close_at, clock)
            if (left is not None and left <= 0) or (more_coming is not None and not more_coming()):
                return batch, None
            item = take(q, left)
        if not claim(item, clock):
            continue
        if size + item.size > max_items:
            return batch, item
        batch.append(item)
        size += item.size
    return batch, None


def split_feeds(feeds: Feeds, max_items: int) -> list[Feeds]:
    """Split feeds along the batch axis into parts of at most ``max_items`` (views, no copies)."""
    n = batch_size(feeds)
    return [{k: v[i : i + max_items] for k, v in feeds.items()} for i in range(0, n, max_items)]


def batch_size(feeds: Feeds) -> int:
    sizes = {name: (arr.shape[0] if arr.ndim else 0) for name, arr in feeds.items()}
    if not sizes:
        raise InputError("no input tensors given")
    if len(set(sizes.values())) != 1:
        raise InputError(f"input tensors disagree on the batch size: {sizes}")
    n = next(iter(sizes.values()))
    if n < 1:
        raise InputError(f"input tensors hold no items (batch size {n})")
    return n


def join(parts: list[Future[Feeds]], parent: Future[Feeds]) -> None:
    """Complete ``parent`` with the parts' outputs concatenated in order, or their first error."""
    remaining = [len(parts)]
    lock = threading.Lock()

    def done(_: Future[Feeds]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        if parent.done():
            return
        # The parent may be cancelled by the caller between the check above and here.
        with contextlib.suppress(InvalidStateError):
            for p in parts:
                if p.cancelled():
                    parent.cancel()
                    return
                if p.exception() is not None:
                    parent.set_exception(p.exception())
                    return
            outs = [p.result() for p in parts]
            parent.set_result({k: np.concatenate([o[k] for o in outs]) for k in outs[0]})

    def cancel_parts(f: Future[Feeds]) -> None:
        if f.cancelled():
            for p in parts:
                p.cancel()

    parent.add_done_callback(cancel_parts)
    for p in parts:
        p.add_done_callback(done)


__all__ = ["BatchFuture", "BatcherClosed", "ClientDisconnected", "Clock", "Feeds", "InferenceFailed",
           "ModelNotReady", "Pending", "QueueFull", "RequestTimeout", "WakeableQueue", "batch_size", "claim",
           "collect", "join", "take", "split_feeds"]
