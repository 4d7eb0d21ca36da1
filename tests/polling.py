"""Waiting in tests without fixed sleeps: poll a condition until it holds or a deadline passes.

The deadline is generous (seconds) so that only a hang reaches it; a test never sleeps a fixed time and
then asserts that something did not happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(cond: Callable[[], object], timeout: float = 10.0, interval: float = 0.002) -> bool:
    """Whether ``cond()`` is true within ``timeout`` seconds, polled every ``interval`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return bool(cond())
        time.sleep(interval)
    return True
