"""Dynamic batching: a bounded queue of requests and one worker thread per model that owns the backend.

The policy and its timers live in :mod:`kiln.serve.batching` (:func:`collect`, pure and tested with a
fake clock); :class:`Batcher` runs it in a worker loop. A batch takes what is queued, up to
``max_items`` items, and stays open for at most ``max_delay`` seconds after its first request only while
more requests are known to be on their way (:meth:`Batcher.announce`): a lone request on an idle
backend runs at once, and requests that arrive while the backend is busy form the next batch. Items,
not requests, count: a request may carry several images, and one larger than ``max_items`` is split
into parts that are re-joined.

Each request gets a future. A future that was cancelled before the worker took it (the client went
away, the handler timed out) is skipped; a request past its deadline fails with
:class:`RequestTimeout` without running. A backend exception fails only the requests of that batch
(:class:`InferenceFailed`) and the worker keeps serving. An asyncio caller waits with
:func:`wait_result`: the worker wakes each event loop once per batch, not once per request.

The backend is created inside the worker thread by a factory, so an engine and its execution context
stay on the thread that runs them (TensorRT and CUDA contexts are not meant to hop threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from queue import Full

import numpy as np

from kiln.errors import InputError, KilnError
from kiln.runtime.base import Backend, pad_batch
from kiln.serve.batching import (
    BatcherClosed,
    BatchFuture,
    ClientDisconnected,
    Clock,
    Feeds,
    InferenceFailed,
    ModelNotReady,
    Pending,
    QueueFull,
    RequestTimeout,
    WakeableQueue,
    batch_size,
    collect,
    join,
    split_feeds,
    take,
)

log = logging.getLogger("kiln.serve.batcher")

_ids = itertools.count(1)
# A backend whose single-item run takes less than this may run a lone request on the caller's thread
# (Batcher.run_inline): the event loop stalls no longer than a thread hand-over would cost.
INLINE_MAX_S = 0.002

# ---- the worker ----------------------------------------------------------------------------------


BatchHook = Callable[[int, float], None]
# (items, backend seconds, each request's seconds in the queue, seconds to gather the inputs, seconds to
# hand the outputs back): Triton's queue, compute_infer, compute_input and compute_output statistics
RunHook = Callable[[int, float, list[float], float, float], None]


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
        self.on_run: RunHook | None = None  # inference statistics (see RunHook)
        self._poll = poll
        self._clock = clock
        self._queue: WakeableQueue = WakeableQueue(maxsize=max_queue)
        self._loaded = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.backend: Backend | None = None
        self.load_error: BaseException | None = None
        self._closed = False
        self._incoming = 0
        self._incoming_lock = threading.Lock()
        self._busy = False  # the worker is running a batch
        self._inline = False  # set by the warm-up: a lone request may run on the caller's thread
        self._inline_lock = threading.Lock()

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
    def announce(self) -> Iterator[Arrival]:
        """Mark a request as on its way (being read and decoded) until the block ends or it is handed
        over with :meth:`Arrival.submit`.

        While none is on its way, a batch does not wait for more (see :func:`collect`); when the last
        one leaves without being queued, a worker waiting for it is woken.
        """
        with self._incoming_lock:
            self._incoming += 1
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival.leave()

    def _leave(self, wake: bool) -> None:
        with self._incoming_lock:
            self._incoming -= 1
            last = self._incoming == 0
        if last and wake:
            self._queue.wake()

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
                f"request of {batch_size(feeds)} items needs {len(parts)} batches of {self.max_items}, more "
                f"than the queue holds ({self.max_queue}); send at most {self.max_queue * self.max_items} "
                "items per request"
            )
        pendings = [
            Pending(f, batch_size(f), request_id=request_id, enqueued=now, deadline=deadline) for f in parts
        ]
        for i, p in enumerate(pendings):
            try:
                self._queue.put_nowait(p)
            except Full:
                for queued in pendings[:i]:
                    queued.future.cancel()
                raise QueueFull(
                    f"model '{self.name}' queue is full ({self.max_queue} requests waiting); retry later"
                ) from None
        if len(pendings) == 1:
            return pendings[0].future
        parent: Future[Feeds] = Future()
        join([p.future for p in pendings], parent)
        return parent

    def run_inline(self, feeds: Feeds, request_id: str = "") -> Feeds | None:
        """Run ``feeds`` on the calling thread when that is cheaper than a hand-over: the backend may run on
        several threads (``thread_safe``), its warm-up took under INLINE_MAX_S, nothing is queued or
        running, no other request is on its way (:meth:`announce`; the caller's own may be), and no
        other inline run is in progress. Returns the outputs, or None when the request must be
        :meth:`submit`-ted. A lone request then costs no thread hop each way; under load requests batch
        on the worker thread as usual, which also lets inference overlap the event loop's work."""
        backend = self.backend
        if (not self._inline or backend is None or self._busy or self._incoming > 1 or self._closed
                or self._stopping.is_set() or self._queue.qsize()
                or not self._inline_lock.acquire(blocking=False)):
            return None
        try:
            n = batch_size(feeds)
            if n > self.max_items:
                return None
            t_in = time.perf_counter()
            padded, pad = pad_batch(feeds, backend.min_batch)
            t0 = time.perf_counter()
            try:
                out = backend.infer(padded)
            except Exception as exc:
                log.error("model '%s': inference failed for %d items", self.name, n, exc_info=True)
                raise InferenceFailed(f"inference failed ({type(exc).__name__}); see the server log",
                                      request_id) from None
            seconds = time.perf_counter() - t0
        finally:
            self._inline_lock.release()
        t_out = time.perf_counter()
        out = {k: v[:n] for k, v in out.items()} if pad else out
        try:
            if self.on_batch is not None:
                self.on_batch(n, seconds)
            if self.on_run is not None:
                self.on_run(n, seconds, [0.0], t0 - t_in, time.perf_counter() - t_out)
        except Exception:  # a metrics hook must never fail the request
            log.exception("metrics hook failed")
        return out

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
                    self._busy = True
                    try:
                        self._run_batch(backend, batch)
                    finally:
                        self._busy = False
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
        """Run the smallest and largest batch once so the first real request pays no lazy setup, then time
        the smallest once more: whether a lone request is cheap enough to run inline (:meth:`run_inline`)."""
        smallest = max(1, backend.min_batch)
        for n in sorted({smallest, self.max_items}):
            feeds = {s.name: np.zeros((n, *s.shape), dtype=np.dtype(s.dtype)) for s in backend.inputs}
            backend.infer(feeds)
        feeds = {s.name: np.zeros((smallest, *s.shape), dtype=np.dtype(s.dtype)) for s in backend.inputs}
        t0 = time.perf_counter()
        backend.infer(feeds)
        self._inline = getattr(backend, "thread_safe", False) and time.perf_counter() - t0 < INLINE_MAX_S

    def _run_batch(self, backend: Backend, batch: list[Pending]) -> None:
        n = sum(p.size for p in batch)
        t_in = time.perf_counter()
        try:
            if len(batch) == 1:
                feeds = batch[0].feeds
            else:
                feeds = {k: np.concatenate([p.feeds[k] for p in batch]) for k in batch[0].feeds}
            feeds, pad = pad_batch(feeds, backend.min_batch)  # outputs of the padding rows are dropped below
            started = self._clock()
            t0 = time.perf_counter()
            out = backend.infer(feeds)
            seconds = time.perf_counter() - t0
            for k, v in out.items():
                if v.shape[0] != n + pad:
                    raise RuntimeError(f"output {k} has batch {v.shape[0]}, expected {n + pad}")
        except Exception as exc:
            ids = ", ".join(p.request_id for p in batch)
            log.error("model '%s': inference failed for %d items (requests %s)", self.name, n, ids,
                      exc_info=True)
            for p in batch:
                p.future.set_exception(
                    InferenceFailed(f"inference failed ({type(exc).__name__}); see the server log",
                                    p.request_id)
                )
            return
        t_out = time.perf_counter()
        offset = 0
        for p in batch:
            p.future.set_result({k: v[offset : offset + p.size] for k, v in out.items()})
            offset += p.size
        wake_loops([p.future for p in batch])
        output_s = time.perf_counter() - t_out
        if self.on_batch is not None:
            try:
                self.on_batch(n, seconds)
            except Exception:  # a metrics hook must never take the worker down
                log.exception("on_batch hook failed")
        if self.on_run is not None:
            try:
                self.on_run(n, seconds, [started - p.enqueued for p in batch], t0 - t_in, output_s)
            except Exception:
                log.exception("on_run hook failed")

    def _cancel_queued(self) -> None:
        while True:
            item = take(self._queue, 0)
            if item is None:
                return
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(
                    BatcherClosed(f"model '{self.name}' stopped before the request ran"))


def _describe(backend: Backend) -> str:
    return f"{backend.name} {backend.precision} on {backend.device}"


class Arrival:
    """A request announced as on its way (:meth:`Batcher.announce`). :meth:`submit` hands it to the
    batcher and stops counting it as coming *before* it is queued, so the worker never waits for the
    very request it has just taken."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.coming = True

    def leave(self, wake: bool = True) -> None:
        if self.coming:
            self.coming = False
            self._batcher._leave(wake)

    def submit(self, feeds: Feeds, request_id: str = "", timeout: float | None = None) -> Future[Feeds]:
        self.leave(wake=False)  # the put below wakes the worker
        try:
            return self._batcher.submit(feeds, request_id, timeout)
        except BaseException:
            self._batcher._queue.wake()  # refused: nothing was put, so tell a waiting worker
            raise


class _LoopWaiter:
    """Wakes one :func:`wait_result` on its event loop. ``wake`` is the future it awaits right now."""

    __slots__ = ("loop", "wake")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.wake: asyncio.Future[None] | None = None

    def notify(self) -> None:
        """From any thread (one wakeup for one request: the error and split-request paths)."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.resolve)

    def resolve(self) -> None:
        if self.wake is not None:
            _resolve(self.wake)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _resolve_all(waiters: list[_LoopWaiter]) -> None:
    for w in waiters:
        w.resolve()


def wake_loops(futures: list[Future[Feeds]]) -> None:
    """One ``call_soon_threadsafe`` per event loop for all of ``futures`` that an asyncio caller awaits.

    Called after the futures are done. A waiter attached after a future was done sees it done itself
    (:func:`wait_result` attaches, then checks), so no wakeup is lost."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_LoopWaiter]] = {}
    for f in futures:
        w = getattr(f, "waiter", None)
        if w is not None:
            by_loop.setdefault(w.loop, []).append(w)
    for loop, waiters in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_all, waiters)


async def wait_result(
    fut: Future[Feeds],
    timeout: float | None,
    is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    poll: float = 0.2,
) -> Feeds:
    """Await a batcher future from asyncio, with a deadline and a check that the client is still there.

    On timeout, disconnect or cancellation of the awaiting task the future is cancelled, so the worker
    skips the request if it has not taken it yet. The wait costs one loop future and one timer; the
    client is asked whether it is still there only every ``poll`` seconds.
    """
    loop = asyncio.get_running_loop()
    waiter = _LoopWaiter(loop)
    if isinstance(fut, BatchFuture):
        fut.waiter = waiter  # the worker wakes the loop once per batch (wake_loops)
    else:  # a split request's joined future, or any other: one wakeup of its own
        fut.add_done_callback(lambda _f: waiter.notify())
    end = None if timeout is None else loop.time() + timeout
    try:
        while not fut.done():
            wake = waiter.wake = loop.create_future()
            if fut.done():  # completed between the check above and the attachment
                break
            tick = loop.time() + poll
            timer = loop.call_at(tick if end is None else min(tick, end), _resolve, wake)
            try:
                await wake
            finally:
                timer.cancel()
            if fut.done():
                break
            if end is not None and loop.time() >= end:
                fut.cancel()
                raise RequestTimeout(f"no result within {timeout:g} s")
            if is_disconnected is not None and await is_disconnected():
                fut.cancel()
                raise ClientDisconnected("client disconnected")
    except asyncio.CancelledError:
        fut.cancel()
        raise
    if fut.cancelled():
        raise asyncio.CancelledError()
    return fut.result()


__all__ = ["Arrival", "Batcher", "BatcherClosed", "ClientDisconnected", "InferenceFailed", "ModelNotReady",
           "Pending", "QueueFull", "RequestTimeout", "collect", "split_feeds", "wait_result", "wake_loops"]
