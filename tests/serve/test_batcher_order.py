"""The batcher's worker with distinct images: split requests come back in order, a refused split
request leaves nothing queued, and small batches are padded up to the engine's minimum batch."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from kiln.bundle import Bundle
from kiln.serve.batcher import (
    Batcher,
    QueueFull,
)
from tests.polling import eventually

from .batching_helpers import feeds, occupy
from .conftest import FakeBackend, make_bundle


class EchoBackend(FakeBackend):
    """Returns each image's first pixel as its only output column: row ``i`` of the output says which
    input it came from. Records every batch it was given."""

    def __init__(self, bundle: Bundle, max_batch: int | None = None) -> None:
        super().__init__(bundle, max_batch)
        self.batches: list[np.ndarray] = []

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feeds["images"]
        self.batches.append(x.copy())
        self.calls.append((x.shape[0], threading.current_thread().name))
        if self.gate is not None:
            self.gate.wait(5)
        first = x.reshape(x.shape[0], -1)[:, :1]
        return {"logits": np.repeat(first, 10, axis=1).astype(np.float32)}


def distinct(n: int, start: float = 1.0) -> dict[str, np.ndarray]:
    """``n`` images, image ``i`` filled with ``start + i`` (no two alike, none zero)."""
    values = start + np.arange(n, dtype=np.float32)
    return {"images": np.broadcast_to(values[:, None, None, None], (n, 1, 28, 28)).copy()}


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[Callable[..., tuple[Batcher, EchoBackend]]]:
    batchers: list[Batcher] = []

    def start(batch_min: int = 1, backend_max: int | None = None,
              **kw: object) -> tuple[Batcher, EchoBackend]:
        bundle = make_bundle(tmp_path / f"b{len(batchers)}")
        bundle.manifest.input.batch.min = batch_min
        made: list[EchoBackend] = []

        def factory() -> EchoBackend:
            made.append(EchoBackend(bundle, max_batch=backend_max))
            return made[-1]

        b = Batcher(factory, name="echo", warmup=False, **kw).start()  # type: ignore[arg-type]
        assert b.wait_ready(10)
        batchers.append(b)
        return b, made[-1]

    yield start
    for b in batchers:
        b.close(drain=False, timeout=5)


def test_split_request_is_rejoined_in_input_order(echo) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = echo(max_batch=3, max_delay=0.0, backend_max=3)
    out = batcher.submit(distinct(10)).result(10)
    assert len(backend.batches) >= 4  # really split: 10 items in batches of at most 3
    np.testing.assert_array_equal(out["logits"][:, 0], 1.0 + np.arange(10))


def test_batched_requests_each_get_their_own_rows(echo) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = echo(max_batch=16, max_delay=0.0)
    backend.gate = threading.Event()
    busy = batcher.submit(distinct(1, start=-1.0))
    assert eventually(lambda: bool(backend.batches))
    futs = [batcher.submit(distinct(n, start=100.0 * (i + 1))) for i, n in enumerate((2, 1, 3))]
    backend.gate.set()
    busy.result(10)
    for i, (f, n) in enumerate(zip(futs, (2, 1, 3), strict=True)):
        np.testing.assert_array_equal(f.result(10)["logits"][:, 0], 100.0 * (i + 1) + np.arange(n))


def test_queue_full_cancels_the_parts_of_a_split_request_already_queued(echo) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = echo(max_batch=1, max_delay=0.0, max_queue=3, backend_max=1)
    backend.gate = threading.Event()
    busy = batcher.submit(distinct(1, start=-1.0))
    assert eventually(lambda: bool(backend.batches))
    fits = batcher.submit(distinct(2, start=10.0))  # two parts: the queue holds 2 of 3
    with pytest.raises(QueueFull):
        batcher.submit(distinct(2, start=50.0))  # its first part fits, its second does not
    backend.gate.set()
    busy.result(10)
    np.testing.assert_array_equal(fits.result(10)["logits"][:, 0], [10.0, 11.0])
    batcher.close(drain=True, timeout=10)
    ran = np.concatenate([b.reshape(b.shape[0], -1)[:, 0] for b in backend.batches])
    assert 50.0 not in ran  # the refused request's queued part never ran
    assert sorted(ran.tolist()) == [-1.0, 10.0, 11.0]


def test_small_batch_is_zero_padded_to_the_engine_minimum(echo) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = echo(batch_min=4, max_batch=8, max_delay=0.0)
    out = batcher.submit(distinct(1, start=7.0)).result(10)
    assert out["logits"].shape == (1, 10)
    assert out["logits"][0, 0] == 7.0
    (sent,) = backend.batches
    assert sent.shape[0] == 4
    assert sent[0, 0, 0, 0] == 7.0 and not sent[1:].any()  # the padding is zeros


def test_a_request_that_did_not_fit_opens_the_next_batch(start_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher, backend = start_batcher(max_batch=4, max_delay=0.0)
    busy = occupy(batcher, backend)
    a, b = batcher.submit(feeds(3)), batcher.submit(feeds(3))
    backend.gate.set()
    assert (
        busy.result(5) and a.result(5)["logits"].shape == (3, 10) and b.result(5)["logits"].shape == (3, 10)
    )
    assert [n for n, _ in backend.calls] == [1, 3, 3]
