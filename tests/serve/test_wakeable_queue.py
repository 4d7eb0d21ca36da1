"""The worker's queue (serve/batching.py `WakeableQueue`): gets with and without a timeout, a wake that
ends the wait in progress (and only a wait that listens for it), an error that wakes the waiter."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from kiln.serve.batching import (
    BatchFuture,
    WakeableQueue,
)


def test_wakeable_queue_get_without_blocking_and_with_a_timeout() -> None:
    q = WakeableQueue()
    with pytest.raises(queue.Empty):
        q.get(block=False)
    with pytest.raises(queue.Empty):
        q.get(timeout=0)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    assert 0.03 < time.monotonic() - t0 < 5
    q.put(1)
    q.put(2)
    assert [q.get(timeout=1), q.get()] == [1, 2]


def test_a_get_waiting_for_good_ends_on_wake_and_on_an_item() -> None:
    q = WakeableQueue(maxsize=1)
    threading.Timer(0.05, q.wake).start()
    with pytest.raises(queue.Empty):
        q.get()
    threading.Timer(0.05, lambda: q.put("x")).start()
    assert q.get() == "x"
    q.put("y")  # the get above made room again
    assert q.get(timeout=1) == "y"


def test_a_wake_before_the_wait_does_not_end_it() -> None:
    q = WakeableQueue()
    q.wake()
    threading.Timer(0.05, lambda: q.put("x")).start()
    assert q.get(timeout=5) == "x"


def test_an_error_wakes_the_waiter_a_result_does_not() -> None:
    class Waiter:
        calls = 0

        def notify(self) -> None:
            self.calls += 1

    failed, done = BatchFuture(), BatchFuture()
    failed.waiter, done.waiter = Waiter(), Waiter()
    failed.set_exception(RuntimeError("x"))
    done.set_result({})
    assert (failed.waiter.calls, done.waiter.calls) == (1, 0)
    BatchFuture().set_exception(RuntimeError("no waiter"))  # none attached: nothing to wake


def test_wakeable_queue_is_unbounded_by_default() -> None:
    q = WakeableQueue()
    for i in range(3):
        q.put_nowait(i)
    assert q.qsize() == 3


def test_a_timed_get_waits_for_an_item_that_comes_within_the_timeout() -> None:
    q = WakeableQueue()
    threading.Timer(0.05, lambda: q.put("x")).start()
    assert q.get(timeout=0.5) == "x"


def test_every_wake_ends_the_wait_in_progress() -> None:
    q = WakeableQueue()
    for _ in range(2):
        threading.Timer(0.05, q.wake).start()
        t0 = time.monotonic()
        with pytest.raises(queue.Empty):
            q.get(timeout=5)
        assert time.monotonic() - t0 < 4


def test_a_wake_leaves_a_wait_for_a_first_request_asleep() -> None:
    """The worker waiting for a first request has nothing to re-check: a wake (a request handled on the
    event loop, or refused) must not cost it a context switch. An item still ends the wait."""
    q = WakeableQueue()
    woke = threading.Event()
    threading.Timer(0.02, q.wake).start()
    threading.Timer(0.3, lambda: q.put("x")).start()

    def notify_spy() -> None:  # any notify while the only waiter does not listen is the bug
        woke.set()
        real()

    real = q.not_empty.notify_all
    q.not_empty.notify_all = notify_spy  # type: ignore[method-assign]
    t0 = time.monotonic()
    assert q.get(timeout=5, wakeable=False) == "x"
    assert time.monotonic() - t0 >= 0.25  # not ended by the wake at 0.02 s
    assert not woke.is_set()
