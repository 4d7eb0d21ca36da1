"""The batching core at its edges, on a fake clock where time matters: input checks with the messages a
client sees, a deadline reached exactly, the first wait, the wake of a waiting worker, the re-joined
result of a split request (order, first error, cancellation both ways)."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.serve.batching import (
    BatchFuture,
    InferenceFailed,
    Pending,
    QueueFull,
    RequestTimeout,
    WakeableQueue,
    batch_size,
    claim,
    collect,
    join,
    split_feeds,
    take,
)

from .test_batcher import FakeClock, FakeQueue, item


def test_queue_full_asks_to_retry_after_a_second_by_default() -> None:
    assert QueueFull("full").retry_after == 1.0 and QueueFull("full", 2.5).retry_after == 2.5
    err = InferenceFailed("inference failed", "r7")
    assert (str(err), err.request_id) == ("inference failed", "r7")


@pytest.mark.parametrize(("feeds", "message"), [
    ({}, "no input tensors given"),
    ({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, "input tensors disagree on the batch size: {'a': 2, 'b': 3}"),
    ({"a": np.zeros((0, 3))}, "input tensors hold no items (batch size 0)"),
    ({"a": np.float32(1.0) * np.ones(())}, "input tensors hold no items (batch size 0)"),
])
def test_bad_inputs_are_named(feeds: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InputError) as info:
        batch_size(feeds)
    assert str(info.value) == message


def test_batch_size_of_agreeing_inputs() -> None:
    assert batch_size({"a": np.zeros((3, 2)), "b": np.zeros((3,))}) == 3


def test_split_feeds_keeps_every_input_and_its_order() -> None:
    x = np.arange(5)
    parts = split_feeds({"a": x, "b": x * 10}, 3)
    assert [list(p["a"]) for p in parts] == [[0, 1, 2], [3, 4]]
    assert [list(p["b"]) for p in parts] == [[0, 10, 20], [30, 40]]


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


def parts(n: int) -> tuple[list[Future], Future]:
    futures: list[Future] = [Future() for _ in range(n)]
    parent: Future = Future()
    join(futures, parent)
    return futures, parent


def test_join_concatenates_in_part_order_whatever_the_finishing_order() -> None:
    futures, parent = parts(3)
    futures[2].set_result({"y": np.array([4, 5]), "z": np.array([40, 50])})
    futures[0].set_result({"y": np.array([0, 1]), "z": np.array([0, 10])})
    assert not parent.done()
    futures[1].set_result({"y": np.array([2, 3]), "z": np.array([20, 30])})
    out = parent.result(0)
    assert list(out["y"]) == [0, 1, 2, 3, 4, 5] and list(out["z"]) == [0, 10, 20, 30, 40, 50]


def test_join_fails_with_the_first_parts_error() -> None:
    futures, parent = parts(3)
    futures[0].set_result({"y": np.array([0])})
    futures[2].set_exception(ValueError("third"))
    futures[1].set_exception(RuntimeError("second"))
    with pytest.raises(RuntimeError, match="second"):
        parent.result(0)


def test_a_cancelled_part_cancels_the_request() -> None:
    futures, parent = parts(2)
    futures[1].cancel()
    futures[0].set_result({"y": np.array([0])})
    assert parent.cancelled()


def test_cancelling_the_request_cancels_its_parts() -> None:
    futures, parent = parts(3)
    futures[0].set_result({"y": np.array([0])})
    assert futures[1].set_running_or_notify_cancel()
    parent.cancel()
    assert futures[2].cancelled() and not futures[0].cancelled() and futures[1].running()
    futures[1].set_result({"y": np.array([1])})  # the last part finishing later changes nothing
    assert parent.cancelled()


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


def test_queue_full_keeps_its_message() -> None:
    assert str(QueueFull("model 'digits' queue is full")) == "model 'digits' queue is full"


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
