"""The batching policy never costs throughput: a lone request on an idle backend runs at once; requests
that queue while the backend is busy form the next batch without a delay timer; the timer runs only
while more requests are known to be on their way, and ends when they are."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kiln.serve.batcher import Batcher, wait_result
from kiln.serve.batching import BatchFuture, WakeableQueue, collect

from .conftest import FakeBackend
from .test_batcher import FakeClock, FakeQueue, item


def test_idle_fast_path_runs_a_lone_request_at_once() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item())
    batch, carry = collect(q, max_items=32, max_delay=0.002, first_timeout=0.1, clock=clock, more_coming=lambda: False)
    assert len(batch) == 1 and carry is None
    # only the get that found the request (it was there: no time passed), no delay timer after it
    assert clock.now == 100.0 and q.waits == [pytest.approx(0.1)]


def test_batch_forms_from_what_queued_while_the_backend_was_busy() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    # Five requests arrived 3 ms ago while the previous batch ran; more are being decoded right now.
    for _ in range(5):
        q.put(item(enqueued=97.0))
    batch, _ = collect(q, max_items=32, max_delay=0.002, first_timeout=0.1, clock=clock, more_coming=lambda: True)
    assert len(batch) == 5
    # the oldest waited past max_delay already: no timer after the first get
    assert clock.now == 100.0 and q.waits == [pytest.approx(0.1)]


def test_delay_timer_only_while_requests_are_on_their_way() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item(enqueued=100.0))
    coming = [True, True, False]  # one wait, then the announced request was refused (never queued)
    batch, _ = collect(q, max_items=32, max_delay=0.010, first_timeout=0, clock=clock,
                       more_coming=lambda: coming.pop(0) if coming else False)
    assert len(batch) == 1
    assert q.waits == [pytest.approx(0.010)]  # bounded by max_delay from the first request
    assert clock.now == pytest.approx(100.010)


def test_wake_ends_a_wait_without_an_item() -> None:
    q = WakeableQueue()
    threading.Timer(0.05, q.wake).start()
    t0 = time.monotonic()
    batch, _ = collect(q, max_items=8, max_delay=5.0, first_timeout=0, carry=item(enqueued=time.monotonic()),
                       more_coming=lambda: time.monotonic() - t0 < 0.04)
    assert len(batch) == 1 and time.monotonic() - t0 < 2.0  # woken and re-checked, not 5 s


def test_arrival_submit_is_not_waited_for(classify_bundle) -> None:  # type: ignore[no-untyped-def]
    batcher = Batcher(lambda: FakeBackend(classify_bundle), name="digits", max_batch=8, max_delay=5.0,
                      warmup=False).start()
    try:
        assert batcher.wait_ready(5)
        t0 = time.monotonic()
        with batcher.announce() as arrival:
            fut = arrival.submit({"images": np.zeros((1, 1, 28, 28), np.float32)})
            assert fut.result(10)["logits"].shape == (1, 10)  # handed over: nothing else is coming
        assert time.monotonic() - t0 < 2.0
    finally:
        batcher.close(timeout=5)


def test_one_loop_wakeup_per_batch(classify_bundle) -> None:  # type: ignore[no-untyped-def]
    backend = FakeBackend(classify_bundle)
    backend.gate = threading.Event()
    batcher = Batcher(lambda: backend, name="digits", max_batch=8, max_delay=0.0, warmup=False).start()

    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        calls = []
        original = loop.call_soon_threadsafe

        def counting(cb, *args, **kw):  # type: ignore[no-untyped-def]
            calls.append(cb)
            return original(cb, *args, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        busy = batcher.submit({"images": np.zeros((1, 1, 28, 28), np.float32)})
        while not backend.calls:
            await asyncio.sleep(0.001)
        futs = [batcher.submit({"images": np.full((1, 1, 28, 28), 0.1 * i, np.float32)}) for i in range(5)]
        assert all(isinstance(f, BatchFuture) for f in futs)
        waits = [asyncio.ensure_future(wait_result(f, 10.0)) for f in futs]
        await asyncio.sleep(0.01)  # every waiter attached before the batch runs
        backend.gate.set()
        outs = await asyncio.gather(*waits)
        busy.result(5)
        assert len(outs) == 5
        return [n for n, _ in backend.calls[1:]], len(calls)

    try:
        assert batcher.wait_ready(5)
        sizes, wakeups = asyncio.run(scenario())
        assert sizes == [5]
        assert wakeups == 1  # one call_soon_threadsafe for the batch of five
    finally:
        batcher.close(timeout=5)
