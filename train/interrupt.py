"""Ctrl-C during training: stop at the next batch boundary, not wherever the signal lands.

Python raises KeyboardInterrupt at whatever bytecode runs when SIGINT arrives (inside a finalizer it
would be printed and dropped). While a run trains, the first Ctrl-C only asks it to stop: the loop raises
KeyboardInterrupt itself at the next batch (the completed epochs are saved as always); a second Ctrl-C
stops at once. A process started with SIGINT ignored (``nohup``, a background job) keeps ignoring it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger("kiln.train")


class StopRequest:
    """Set by the SIGINT handler; :meth:`check` raises KeyboardInterrupt once it is."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[StopRequest]:
    """A :class:`StopRequest` set by Ctrl-C while the block runs. Only on the main thread and when SIGINT
    still has Python's default handler (an embedding program keeps its own); elsewhere it is never set."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.requested:  # the second Ctrl-C
            raise KeyboardInterrupt
        stop.requested = True
        log.warning("Ctrl-C: stopping after this batch (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


__all__ = ["StopRequest", "stop_on_sigint"]
