"""Noticing a run slowed down by other processes on the same cores.

PyTorch's OpenMP threads spin-wait for each other; when another process holds some of the cores, a
waiting thread burns the time slice the thread it waits for needs, and an epoch can take several times
longer. The fix is an environment setting read when torch loads, so all kiln can do mid-run is say so.
"""

from __future__ import annotations

from collections.abc import Sequence

# An epoch this many times slower than the best so far is not noise (first-epoch warm-up, a busy disk).
SLOWDOWN = 3.0


def throttle_warning(rates: Sequence[float], *, slowdown: float = SLOWDOWN) -> str | None:
    """A warning when the last epoch's throughput (``rates[-1]``, images/s) is below the best earlier
    epoch's divided by ``slowdown``, naming the likely cause and the settings; None otherwise."""
    if len(rates) < 2:
        return None
    best, last = max(rates[:-1]), rates[-1]
    if not (best > 0 and last < best / slowdown):
        return None
    return (f"epoch {len(rates)} ran at {last:.0f} images/s, {best / max(last, 1e-9):.1f}x slower than the "
            f"best epoch so far ({best:.0f} images/s): other processes are probably using these CPU cores. "
            "Start kiln with OMP_NUM_THREADS=<free cores> (and OMP_WAIT_POLICY=PASSIVE, kiln's default) "
            "so PyTorch's threads stop spin-waiting for busy cores")
