"""The batching policy never costs throughput: a lone request on an idle backend runs at once; requests
that queue while the backend is busy form the next batch without a delay timer; the timer runs only
while more requests are known to be on their way, and ends when they are."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.serve.batcher import (
    Batcher,
    InferenceFailed,
    RequestTimeout,
    wait_result,
)
from kiln.serve.batching import BatchFuture
from tests.polling import eventually

from .batching_helpers import feeds
from .conftest import FakeBackend


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
        await asyncio.sleep(0)  # each waiter runs up to its first await: attached before the batch runs
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


def test_announce_counts_requests_on_their_way(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=8, max_delay=60.0)
    backend.calls.clear()
    # nothing announced: a lone request does not wait for the 60 s window
    assert batcher.submit(feeds(1)).result(30)["logits"].shape == (1, 10)
    with batcher.announce():
        first = batcher.submit(feeds(1))
        assert eventually(lambda: batcher.qsize() == 0)  # the worker holds it, waiting for the announced one
        second = batcher.submit(feeds(1))
    first.result(30), second.result(30)
    assert [n for n, _ in backend.calls] == [1, 2]


def test_arrival_submit_passes_the_id_and_timeout_and_stops_counting(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_delay=0.0)
    backend.fail_next = True
    with batcher.announce() as arrival:
        fut = arrival.submit(feeds(1), "r5", 30.0)
        assert arrival.coming is False
    with pytest.raises(InferenceFailed) as info:
        fut.result(5)
    assert info.value.request_id == "r5"


def test_a_deadline_from_arrival_submit_expires(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=1, max_delay=0.0)
    backend.gate = threading.Event()
    busy = batcher.submit(feeds(1))
    assert eventually(lambda: bool(backend.calls))
    with batcher.announce() as arrival:
        submitted = time.monotonic()
        late = arrival.submit(feeds(1), "late", 0.01)
    assert eventually(lambda: time.monotonic() > submitted + 0.02)  # its deadline passed in the queue
    backend.gate.set()
    assert busy.result(5)
    with pytest.raises(RequestTimeout, match="request late waited past its deadline"):
        late.result(5)


def test_a_batch_waiting_for_an_announced_request_closes_when_it_leaves(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = start_batcher(max_delay=30.0)
    with batcher.announce() as mine:
        with batcher.announce():  # another request being read
            fut = mine.submit(feeds(1))
            assert eventually(lambda: batcher.qsize() == 0)  # the worker holds it, waiting for the other one
        assert fut.result(5)["logits"].shape == (1, 10)  # it left unsent: the batch closed, not after 30 s


def test_a_refused_announced_request_closes_the_batch_waiting_for_it(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, _ = start_batcher(max_delay=30.0)
    with batcher.announce() as mine, batcher.announce() as other:
        fut = mine.submit(feeds(1))
        assert eventually(lambda: batcher.qsize() == 0)  # the worker holds it, waiting for the other one
        with pytest.raises(InputError):
            other.submit({})
        assert fut.result(5)["logits"].shape == (1, 10)


def test_an_arrival_without_an_id_is_named_after_the_model(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_delay=0.0)
    backend.fail_next = True
    with batcher.announce() as arrival:
        fut = arrival.submit(feeds(1))
    with pytest.raises(InferenceFailed) as info:
        fut.result(5)
    assert info.value.request_id.startswith("digits-")
