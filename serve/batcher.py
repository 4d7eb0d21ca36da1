"""Dynamic batching: a bounded queue of requests and one worker thread per model that owns the backend.

The core is :func:`collect`, a pure function over a :class:`queue.Queue` that forms one batch; the
:class:`Batcher` wraps it in a worker loop. A batch closes when it holds ``max_items`` items or
``max_delay`` seconds after its first request was queued. Items, not requests, count: a request may
carry several images, and one larger than ``max_items`` is split into parts that are re-joined.

Each request gets a :class:`concurrent.futures.Future`. A future that was cancelled before the worker
took it (the client went away, the handler timed out) is skipped; a request past its deadline fails
with :class:`RequestTimeout` without running. A backend exception fails only the requests of that
batch (:class:`InferenceFailed`) and the worker keeps serving.

The backend is created inside the worker thread by a factory, so an engine and its execution context
stay on the thread that runs them (TensorRT and CUDA contexts are not meant to hop threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from kiln.errors import InputError, KilnError
from kiln.runtime.base import Backend

log = logging.getLogger("kiln.serve.batcher")

Feeds = dict[str, np.ndarray]
Clock = Callable[[], float]

_ids = itertools.count(1)


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


@dataclass(eq=False)
class Pending:
    """One queued request (or one part of a split request). ``size`` items along the batch axis."""

    feeds: Feeds
    size: int
    future: Future[Feeds] = field(default_factory=Future)
    request_id: str = ""
    enqueued: float = 0.0
    deadline: float | None = None


# ---- the testable core ---------------------------------------------------------------------------


def _get(q: queue.Queue[Pending], timeout: float | None) -> Pending | None:
    """``None`` blocks, ``<= 0`` only takes what is already queued."""
    try:
        if timeout is None:
            return q.get()
        if timeout <= 0:
            return q.get_nowait()
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
    yet); when the queue is empty and nothing is on its way the batch closes at once instead of
    waiting out ``max_delay``, so a lone request pays no batching delay.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    first = carry
    if first is None:
        until = None if first_timeout is None else clock() + first_timeout
        while first is None:
            item = _get(q, _remaining(until, clock))
            if item is None:
                return [], None
            if claim(item, clock):
                first = item
    batch, size = [first], first.size
    close_at = None if max_delay is None else first.enqueued + max_delay
    while size < max_items:
        item = _get(q, 0)
        if item is None:
            if more_coming is not None and not more_coming():
                break
            item = _get(q, _remaining(close_at, clock))
            if item is None:
                break
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


def _join(parts: list[Future[Feeds]], parent: Future[Feeds]) -> None:
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
                    parent.set_exception(p.exception())  # type: ignore[arg-type]
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


# ---- the worker ----------------------------------------------------------------------------------


BatchHook = Callable[[int, float], None]


class Batcher:
    """A bounded queue and one worker thread that owns the backend built by ``factory``.

    ``max_batch`` caps the items per batch (the backend's own ``max_batch`` caps it further once it is
    loaded); ``max_delay`` is in seconds; ``max_queue`` counts queued requests. ``on_batch(items,
    seconds)`` is called after each successful inference (metrics). Call :meth:`start`, wait with
    :meth:`wait_ready`, :meth:`submit` from any thread, and :meth:`close` to drain and stop.
    """

    def __init__(
        self,
        factory: Callable[[], Backend],
        *,
        name: str = "model",
        max_batch: int | None = None,
        max_delay: float = 0.002,
        max_queue: int = 256,
        warmup: bool = True,
        on_batch: BatchHook | None = None,
        poll: float = 0.1,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay < 0:
            raise ValueError(f"max_delay must be >= 0, got {max_delay}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.name = name
        self._factory = factory
        self._requested_max = max_batch
        self.max_items = max_batch or 1
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._warmup = warmup
        self.on_batch = on_batch
        self._poll = poll
        self._clock = clock
        self._queue: queue.Queue[Pending] = queue.Queue(maxsize=max_queue)
        self._loaded = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.backend: Backend | None = None
        self.load_error: BaseException | None = None
        self._closed = False
        self._incoming = 0
        self._incoming_lock = threading.Lock()

    # -- lifecycle --

    def start(self) -> Batcher:
        if self._thread is not None:
            raise RuntimeError("batcher already started")
        self._thread = threading.Thread(target=self._run, name=f"kiln-batcher-{self.name}", daemon=True)
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self.backend is not None and not self._stopping.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the backend is loaded and warmed up (True) or failed / timed out (False)."""
        self._loaded.wait(timeout)
        return self.ready

    def qsize(self) -> int:
        return self._queue.qsize()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests. With ``drain``, queued requests still run; otherwise they are cancelled.

        Waits up to ``timeout`` seconds for the worker to finish and close the backend.
        """
        self._closed = True
        if not drain:
            self._cancel_queued()
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._cancel_queued()

    # -- requests --

    @contextlib.contextmanager
    def announce(self) -> Iterator[None]:
        """Mark a request as on its way (being read and decoded) until it is submitted or fails.

        While none is on its way, a batch does not wait for more (see :func:`collect`).
        """
        with self._incoming_lock:
            self._incoming += 1
        try:
            yield
        finally:
            with self._incoming_lock:
                self._incoming -= 1

    def _more_coming(self) -> bool:
        return self._incoming > 0

    def submit(self, feeds: Feeds, request_id: str = "", timeout: float | None = None) -> Future[Feeds]:
        """Queue ``feeds`` (arrays with a leading batch axis); the future resolves to the outputs' rows.

        Raises :class:`QueueFull` when the queue has no room, :class:`BatcherClosed` after close and
        :class:`ModelNotReady` if the backend failed to load.
        """
        if self._closed or self._stopping.is_set():
            raise BatcherClosed(f"model '{self.name}' is shutting down")
        if self.load_error is not None:
            raise ModelNotReady(f"model '{self.name}' failed to load: {self.load_error}")
        request_id = request_id or f"{self.name}-{next(_ids)}"
        batch_size(feeds)
        now = self._clock()
        deadline = None if timeout is None else now + timeout
        parts = split_feeds(feeds, self.max_items)
        if len(parts) > self.max_queue:  # could never fit, so "retry later" would be a lie
            raise InputError(
                f"request of {batch_size(feeds)} items needs {len(parts)} batches of {self.max_items}, more than "
                f"the queue holds ({self.max_queue}); send at most {self.max_queue * self.max_items} items per request"
            )
        pendings = [
            Pending(f, batch_size(f), request_id=request_id, enqueued=now, deadline=deadline) for f in parts
        ]
        for i, p in enumerate(pendings):
            try:
                self._queue.put_nowait(p)
            except queue.Full:
                for queued in pendings[:i]:
                    queued.future.cancel()
                raise QueueFull(
                    f"model '{self.name}' queue is full ({self.max_queue} requests waiting); retry later"
                ) from None
        if len(pendings) == 1:
            return pendings[0].future
        parent: Future[Feeds] = Future()
        _join([p.future for p in pendings], parent)
        return parent

    # -- worker --

    def _run(self) -> None:
        try:
            backend = self._factory()
        except BaseException as exc:
            self._fail_load(exc)
            return
        try:
            cap = backend.max_batch
            self.max_items = min(self._requested_max, cap) if self._requested_max else cap
            if self._warmup:
                self._warm(backend)
        except BaseException as exc:
            backend.close()
            self._fail_load(exc)
            return
        self.backend = backend
        self._loaded.set()
        log.info("model '%s' ready: %s (max batch %d)", self.name, _describe(backend), self.max_items)
        carry: Pending | None = None
        try:
            while True:
                stopping = self._stopping.is_set()
                batch, carry = collect(
                    self._queue,
                    self.max_items,
                    0.0 if stopping else self.max_delay,
                    first_timeout=0.0 if stopping else self._poll,
                    carry=carry,
                    clock=self._clock,
                    more_coming=self._more_coming,
                )
                if batch:
                    self._run_batch(backend, batch)
                elif stopping:
                    break
        finally:
            backend.close()
            log.info("model '%s' worker stopped", self.name)

    def _fail_load(self, exc: BaseException) -> None:
        self.load_error = exc
        log.error("model '%s' failed to load: %s", self.name, exc, exc_info=not isinstance(exc, KilnError))
        self._loaded.set()
        self._cancel_queued()

    def _warm(self, backend: Backend) -> None:
        """Run the smallest and largest batch once so the first real request pays no lazy setup."""
        for n in sorted({max(1, backend.min_batch), self.max_items}):
            feeds = {s.name: np.zeros((n, *s.shape), dtype=np.dtype(s.dtype)) for s in backend.inputs}
            backend.infer(feeds)

    def _run_batch(self, backend: Backend, batch: list[Pending]) -> None:
        n = sum(p.size for p in batch)
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds
            else:
                feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
            pad = max(0, backend.min_batch - n)
            if pad:  # an engine profile may start above 1: pad with zeros and drop their outputs
                feeds = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in feeds.items()}
            t0 = time.perf_counter()
            out = backend.infer(feeds)
            seconds = time.perf_counter() - t0
            for k, v in out.items():
                if v.shape[0] != n + pad:
                    raise RuntimeError(f"output {k} has batch {v.shape[0]}, expected {n + pad}")
        except Exception as exc:
            ids = ", ".join(p.request_id for p in batch)
            log.error("model '%s': inference failed for %d items (requests %s)", self.name, n, ids, exc_info=True)
            for p in batch:
                p.future.set_exception(
                    InferenceFailed(f"inference failed ({type(exc).__name__}); see the server log", p.request_id)
                )
            return
        offset = 0
        for p in batch:
            p.future.set_result({k: v[offset : offset + p.size] for k, v in out.items()})
            offset += p.size
        if self.on_batch is not None:
            try:
                self.on_batch(n, seconds)
            except Exception:  # a metrics hook must never take the worker down
                log.exception("on_batch hook failed")

    def _cancel_queued(self) -> None:
        while True:
            item = _get(self._queue, 0)
            if item is None:
                return
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(BatcherClosed(f"model '{self.name}' stopped before the request ran"))


def _describe(backend: Backend) -> str:
    return f"{backend.name} {backend.precision} on {backend.device}"


async def wait_result(
    fut: Future[Feeds],
    timeout: float | None,
    is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    poll: float = 0.2,
) -> Feeds:
    """Await a batcher future from asyncio, with a deadline and a check that the client is still there.

    On timeout, disconnect or cancellation of the awaiting task the future is cancelled, so the worker
    skips the request if it has not taken it yet.
    """
    loop = asyncio.get_running_loop()
    afut = asyncio.wrap_future(fut, loop=loop)
    end = None if timeout is None else loop.time() + timeout
    try:
        while True:
            wait = poll if end is None else max(0.0, min(poll, end - loop.time()))
            done, _ = await asyncio.wait({afut}, timeout=wait)
            if done:
                return afut.result()
            if end is not None and loop.time() >= end:
                fut.cancel()
                afut.cancel()
                raise RequestTimeout(f"no result within {timeout:g} s")
            if is_disconnected is not None and await is_disconnected():
                fut.cancel()
                afut.cancel()
                raise ClientDisconnected("client disconnected")
    except asyncio.CancelledError:
        fut.cancel()
        afut.cancel()
        raise
