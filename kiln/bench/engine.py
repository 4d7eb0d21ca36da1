"""Timing one backend in-process: warm-up, synchronize, time each ``infer()``.

On the CPU each ``infer()`` is timed with ``time.perf_counter_ns``; the call includes what the backend
does for the caller (input checks, copying outputs). On CUDA the torch backend is timed with
``torch.cuda.Event`` pairs recorded after a synchronize; a TensorRT backend reports its own per-phase
times (host-to-device copy, compute, device-to-host copy) like trtexec, read after each call.

This module imports no backend library and nothing of ``kiln.runtime``: export and calibration time
candidate graphs with :func:`time_backend` without pulling in the bench sweep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PHASES = ("h2d", "compute", "d2h")
# A --duration run stops at whichever comes first: the time or this many calls.
MAX_ITERS = 1_000_000


def _phase_times(backend: Any) -> dict[str, float] | None:
    """Per-phase milliseconds of the last infer() if the backend measures them (TensorRT)."""
    timings = getattr(backend, "last_timings", None)
    if callable(timings):
        timings = timings()
    if not timings:
        return None
    out: dict[str, float] = {}
    for phase in PHASES:
        for key in (phase, f"{phase}_ms"):
            if key in timings and timings[key] is not None:
                out[phase] = float(timings[key])
                break
    return out or None


def _timer(backend: Any) -> tuple[str, Callable[[dict[str, np.ndarray]], float]]:
    """(timer name, a function running one infer and returning its milliseconds)."""
    device = str(getattr(backend, "device", "cpu"))
    if backend.name == "torch" and device.startswith("cuda"):
        # Only a CUDA torch backend gets here, and it has imported torch already.
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def cuda_timed(feeds: dict[str, np.ndarray]) -> float:
            # Wait for earlier work first, or its tail would be billed to this call.
            torch.cuda.synchronize()
            start.record()
            backend.infer(feeds)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        return "cuda-event", cuda_timed

    def wall(feeds: dict[str, np.ndarray]) -> float:
        t0 = time.perf_counter_ns()
        backend.infer(feeds)
        return (time.perf_counter_ns() - t0) / 1e6

    return "perf_counter", wall


def time_backend(backend: Any, feeds: dict[str, np.ndarray], warmup: int, iters: int | None,
                 duration: float | None) -> tuple[list[float], dict[str, list[float]], float, str]:
    """Warm up, then time calls: (samples ms, phase samples ms, wall seconds of the timed loop, timer)."""
    name, timed = _timer(backend)
    for _ in range(warmup):
        backend.infer(feeds)
    samples: list[float] = []
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    limit = iters if iters is not None else MAX_ITERS
    deadline = time.perf_counter() + duration if duration is not None else math.inf
    t0 = time.perf_counter()
    while len(samples) < limit and (not samples or time.perf_counter() < deadline):
        samples.append(timed(feeds))
        if (ph := _phase_times(backend)) is not None:
            for k, v in ph.items():
                phases[k].append(v)
    wall = time.perf_counter() - t0
    return samples, {k: v for k, v in phases.items() if v}, wall, name
