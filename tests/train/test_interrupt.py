"""Ctrl-C while training: the first asks for a stop at the next batch, the second stops at once; the
processes of a group stop together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.train.interrupt import StopRequest, stop_on_sigint


@pytest.fixture(autouse=True)
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler, whatever the test process inherited (a background job gets SIGINT
    ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _sigint() -> None:
    # raise_signal runs the Python-level handler before it returns (it checks pending signals itself)
    signal.raise_signal(signal.SIGINT)


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
    assert seen and not seen[0].requested and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_ignored_by_the_parent_stays_ignored() -> None:
    """`nohup kiln train ...` or a background job: SIGINT was ignored when kiln started; it stays so."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with stop_on_sigint() as stop:
        _sigint()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert not stop.requested


_RANK = """
import sys, time
import torch.distributed as dist
from kiln.train.interrupt import StopRequest

rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
stop = StopRequest(dist.new_group(backend="gloo"))
for check in range(50):
    if rank == 1 and check == 5:
        stop.requested = True  # Ctrl-C reached one process only, between two batches
    try:
        stop.check()
    except KeyboardInterrupt:
        print(check)
        break
    time.sleep(0.01 * (2 - rank))  # the processes run at different speeds
dist.destroy_process_group()
"""


def test_processes_of_a_group_stop_at_the_same_check(tmp_path: Path) -> None:
    """One process asked to stop: every process stops at the same batch, the next one (a process that
    stopped alone would leave the others waiting in the next gradient all-reduce)."""
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(rank), init], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["6", "6"]
