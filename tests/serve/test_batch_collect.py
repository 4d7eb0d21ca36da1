"""When the batching core (serve/batching.py `collect`, `take`) closes a batch, on a plain queue with a
fake clock: at max items, at max delay after the first request, at once when nothing more is on its way;
the first wait, timeouts of 0 and None, deadlines, cancelled and expired requests skipped, the overflow
carried to the next batch."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from kiln.serve.batching import (
    Pending,
    RequestTimeout,
    WakeableQueue,
    claim,
    collect,
    take,
)

from .batching_helpers import FakeClock, FakeQueue, item


def test_batch_closes_at_max_items() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    for _ in range(5):
        q.put(item())
    batch, carry = collect(q, max_items=4, max_delay=10.0, first_timeout=None, clock=clock)
    assert [p.size for p in batch] == [1, 1, 1, 1]
    assert carry is None
    assert clock.now == 100.0  # full before any wait
    assert q.qsize() == 1


def test_batch_closes_at_max_delay_after_first_request() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item(enqueued=99.0))  # queued 1 s ago: the 2.5 s window has 1.5 s left
    batch, carry = collect(q, max_items=8, max_delay=2.5, first_timeout=None, clock=clock)
    assert len(batch) == 1 and carry is None
    assert q.waits[-1] == pytest.approx(1.5)
    assert clock.now == pytest.approx(101.5)


def test_first_timeout_expires_with_empty_batch() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    batch, carry = collect(q, max_items=8, max_delay=1.0, first_timeout=0.25, clock=clock)
    assert batch == [] and carry is None
    assert q.waits == [0.25]


def test_timeout_zero_takes_only_what_is_queued() -> None:
    q: queue.Queue[Pending] = queue.Queue()
    assert collect(q, max_items=8, max_delay=0.0, first_timeout=0.0) == ([], None)
    q.put(item())
    q.put(item())
    t0 = time.monotonic()
    batch, _ = collect(q, max_items=8, max_delay=0.0, first_timeout=0.0)
    assert len(batch) == 2
    assert time.monotonic() - t0 < 1.0  # no wait at all; the bound only catches a blocking get


def test_max_delay_none_waits_until_full_and_real_timer_fires() -> None:
    q: queue.Queue[Pending] = queue.Queue()
    first = item(enqueued=time.monotonic())
    q.put(first)
    threading.Timer(0.05, lambda: q.put(item(enqueued=time.monotonic()))).start()
    batch, _ = collect(q, max_items=2, max_delay=None, first_timeout=0.0)
    assert len(batch) == 2
    # and a real max_delay closes a batch that never fills
    q.put(item(enqueued=time.monotonic()))
    t0 = time.monotonic()
    batch, _ = collect(q, max_items=8, max_delay=0.05, first_timeout=0.0)
    assert len(batch) == 1
    assert 0.03 < time.monotonic() - t0 < 5.0  # waited out the window, and did not block for good


def test_items_not_requests_count_and_overflow_is_carried() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item(3))
    q.put(item(3))
    q.put(item(1))
    batch, carry = collect(q, max_items=5, max_delay=1.0, clock=clock, first_timeout=0)
    assert [p.size for p in batch] == [3]
    assert carry is not None and carry.size == 3
    batch, carry = collect(q, max_items=5, max_delay=1.0, clock=clock, carry=carry, first_timeout=0)
    assert [p.size for p in batch] == [3, 1]
    assert carry is None


def test_cancelled_and_expired_requests_are_skipped() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    gone, expired, live = item(rid="gone"), item(deadline=99.0, rid="late"), item(rid="live")
    gone.future.cancel()
    for p in (gone, expired, live):
        q.put(p)
    batch, _ = collect(q, max_items=8, max_delay=0.0, clock=clock, first_timeout=0)
    assert batch == [live]
    assert live.future.running()
    with pytest.raises(RequestTimeout):
        expired.future.result(0)


def test_collect_rejects_bad_max_items() -> None:
    with pytest.raises(ValueError):
        collect(queue.Queue(), max_items=0, max_delay=0.0)


def test_batch_closes_at_once_when_nothing_more_is_coming() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item())
    batch, _ = collect(q, max_items=8, max_delay=5.0, first_timeout=0, clock=clock, more_coming=lambda: False)
    assert len(batch) == 1 and clock.now == 100.0  # no wait for a lone request
    q.put(item())
    batch, _ = collect(q, max_items=8, max_delay=5.0, first_timeout=0, clock=clock, more_coming=lambda: True)
    assert len(batch) == 1 and clock.now == pytest.approx(105.0)  # a request was on its way: waited


def test_idle_fast_path_runs_a_lone_request_at_once() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item())
    batch, carry = collect(q, max_items=32, max_delay=0.002, first_timeout=0.1, clock=clock,
                           more_coming=lambda: False)
    assert len(batch) == 1 and carry is None
    # only the get that found the request (it was there: no time passed), no delay timer after it
    assert clock.now == 100.0 and q.waits == [pytest.approx(0.1)]


def test_batch_forms_from_what_queued_while_the_backend_was_busy() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    # Five requests arrived 3 ms ago while the previous batch ran; more are being decoded right now.
    for _ in range(5):
        q.put(item(enqueued=97.0))
    batch, _ = collect(q, max_items=32, max_delay=0.002, first_timeout=0.1, clock=clock,
                       more_coming=lambda: True)
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


def test_a_request_reaching_its_deadline_exactly_times_out_naming_it() -> None:
    clock = FakeClock()
    late = item(deadline=clock.now, rid="r42")
    assert claim(late, clock) is False
    with pytest.raises(RequestTimeout, match="^request r42 waited past its deadline$"):
        late.future.result(0)
    just_in_time = item(deadline=clock.now + 0.001)
    assert claim(just_in_time, clock) is True and just_in_time.future.running()


def test_a_cancelled_request_past_its_deadline_stays_cancelled() -> None:
    clock = FakeClock()
    gone = item(deadline=clock.now - 1)
    gone.future.cancel()
    assert claim(gone, clock) is False and gone.future.cancelled()


def test_the_first_wait_is_measured_from_now_on_the_clock() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    assert collect(q, max_items=4, max_delay=1.0, first_timeout=0.5, clock=clock) == ([], None)
    assert q.waits == [0.5] and clock.now == 100.5


def test_expired_requests_are_skipped_while_waiting_for_a_first() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    late, live = item(deadline=50.0), item(rid="live")
    q.put(late)
    q.put(live)
    batch, carry = collect(q, max_items=4, max_delay=0.0, first_timeout=1.0, clock=clock)
    assert batch == [live] and carry is None


def test_with_nothing_on_its_way_the_batch_closes_without_waiting() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item())
    batch, _ = collect(q, max_items=4, max_delay=5.0, first_timeout=0, clock=clock, more_coming=lambda: False)
    assert len(batch) == 1 and clock.now == 100.0


def test_a_request_on_its_way_keeps_the_batch_open_until_max_delay() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    q.put(item(enqueued=100.0))
    batch, _ = collect(q, max_items=4, max_delay=2.0, first_timeout=0, clock=clock, more_coming=lambda: True)
    assert len(batch) == 1 and clock.now == 102.0


def test_a_batch_exactly_full_carries_nothing() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    for size in (2, 2, 1):
        q.put(item(size))
    batch, carry = collect(q, max_items=4, max_delay=1.0, first_timeout=0, clock=clock)
    assert [p.size for p in batch] == [2, 2] and carry is None and q.qsize() == 1


def test_take() -> None:
    q: queue.Queue[Pending] = queue.Queue()
    assert take(q, 0) is None and take(q, -1) is None
    t0 = time.monotonic()
    assert take(q, 0.05) is None
    assert 0.03 < time.monotonic() - t0 < 5
    p = item()
    q.put(p)
    assert take(q, None) is p


def test_bad_max_items_is_named() -> None:
    with pytest.raises(ValueError, match="^max_items must be >= 1, got 0$"):
        collect(queue.Queue(), max_items=0, max_delay=0.0)


def test_deadlines_are_read_on_the_given_clock() -> None:
    """A clock far behind the real monotonic one: requests due later on it are all taken."""
    clock = FakeClock()
    clock.now = -1000.0
    q = FakeQueue(clock)
    items = [item(enqueued=-1000.0, deadline=-999.0) for _ in range(3)]
    for p in items:
        q.put(p)
    batch, carry = collect(q, max_items=8, max_delay=0.0, first_timeout=0, clock=clock)
    assert batch == items and carry is None


def test_a_cancelled_request_in_the_middle_is_skipped_and_the_rest_join() -> None:
    clock = FakeClock()
    q = FakeQueue(clock)
    first, gone, last = item(rid="a"), item(rid="b"), item(rid="c")
    gone.future.cancel()
    for p in (first, gone, last):
        q.put(p)
    batch, _ = collect(q, max_items=8, max_delay=0.0, first_timeout=0, clock=clock)
    assert batch == [first, last]


def test_take_passes_wakeable_to_a_wakeable_queue_only() -> None:
    q = WakeableQueue()
    threading.Timer(0.02, q.wake).start()
    t0 = time.monotonic()
    assert take(q, 0.3, wakeable=False) is None
    assert time.monotonic() - t0 >= 0.25
    threading.Timer(0.02, q.wake).start()
    t0 = time.monotonic()
    assert take(q, 5) is None
    assert time.monotonic() - t0 < 4
    plain: queue.Queue[Pending] = queue.Queue()
    assert take(plain, 0.01, wakeable=False) is None
