"""A request split over batches and joined again (serve/batching.py): the input checks with the messages
a client reads, the batch size, split views in order, and the re-joined result (part order, the first
error, cancellation both ways)."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from kiln.errors import InputError
from kiln.serve.batching import (
    batch_size,
    join,
    split_feeds,
)


def test_split_feeds_views() -> None:
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    parts = split_feeds({"x": x}, 2)
    assert [p["x"].shape[0] for p in parts] == [2, 2, 1]
    assert np.shares_memory(parts[0]["x"], x)


@pytest.mark.parametrize(("feeds", "message"), [
    ({}, "no input tensors given"),
    ({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))},
     "input tensors disagree on the batch size: {'a': 2, 'b': 3}"),
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
