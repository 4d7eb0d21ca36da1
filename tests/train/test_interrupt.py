"""Ctrl-C while training: the first asks for a stop at the next batch, the second stops at once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from kiln.train.interrupt import StopRequest, stop_on_sigint


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # the handler runs on the main thread at its next bytecode


def test_first_ctrl_c_sets_the_request_second_raises_and_the_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGINT)
    with stop_on_sigint() as stop:
        stop.check()  # nothing asked yet
        _sigint()
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            _sigint()
    assert signal.getsignal(signal.SIGINT) is before


def test_an_embedding_programs_handler_and_other_threads_are_left_alone() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with stop_on_sigint() as stop:
            _sigint()
        assert calls == [signal.SIGINT] and not stop.requested
    finally:
        signal.signal(signal.SIGINT, previous)
    seen: list[StopRequest] = []

    def in_thread() -> None:
        with stop_on_sigint() as s:
            seen.append(s)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert seen and not seen[0].requested and signal.getsignal(signal.SIGINT) is previous
