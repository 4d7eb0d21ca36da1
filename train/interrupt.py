"""Ctrl-C during training: stop at the next batch boundary, not wherever the signal lands.

Python raises KeyboardInterrupt at whatever bytecode runs when SIGINT arrives (inside a finalizer it
would be printed and dropped). While a run trains, the first Ctrl-C only asks it to stop: the loop raises
KeyboardInterrupt itself at the next batch (the completed epochs are saved as always); a second Ctrl-C
stops at once. A process started with SIGINT ignored (``nohup``, a background job) keeps ignoring it.
The processes of a DDP run stop together, at the same batch (:class:`StopRequest`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

log = logging.getLogger("kiln.train")


class StopRequest:
    """Set by the SIGINT handler; :meth:`check` raises KeyboardInterrupt once it is.

    In a process group (DDP), the processes must stop at the same batch, or one would wait forever in
    the next gradient all-reduce for another that stopped. Each :meth:`check` therefore starts a
    non-blocking all-reduce (MAX) of the request over a gloo group of its own and raises when the
    exchange started at the previous check says that any process was asked: every process raises at
    the same check, one batch after the request, and no check waits for more than the previous
    exchange (CPU tensors, so no GPU synchronization). Every process must call :meth:`check` equally
    often, as the training loop does (once per epoch and once per batch, the same batches everywhere).
    """

    def __init__(self, group: Any = None) -> None:
        self.requested = False
        self._group = group
        self._pending: tuple[Any, Any] | None = None  # (work, flag tensor) of the last exchange

    def check(self) -> None:
        if self._group is None:
            if self.requested:
                raise KeyboardInterrupt
            return
        import torch
        import torch.distributed as dist

        if self._pending is not None:
            work, flag = self._pending
            self._pending = None
            work.wait()
            if flag.item():
                raise KeyboardInterrupt
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)

    def close(self) -> None:
        """Finish the exchange in flight, so the process group can be torn down cleanly."""
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            work.wait()


def _stop_group() -> Any:
    """A gloo group over the whole process group for the stop exchange, or None outside one."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.new_group(backend="gloo")


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[StopRequest]:
    """A :class:`StopRequest` set by Ctrl-C while the block runs. Only on the main thread and when SIGINT
    still has Python's default handler (an embedding program keeps its own); elsewhere it is never set.
    In a process group every process calls this (it creates a group) and only rank 0 logs the request."""
    stop = StopRequest(_stop_group())
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield stop
        stop.close()
        return
    main = os.environ.get("RANK", "0") == "0"

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.requested:  # the second Ctrl-C
            raise KeyboardInterrupt
        stop.requested = True
        if main:
            log.warning("Ctrl-C: stopping after this batch (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
        stop.close()
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["StopRequest", "stop_on_sigint"]
