"""Latency statistics: percentiles and summaries of samples in milliseconds, on numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear interpolation (numpy's default)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    return float(np.percentile(arr, q))


def summarize(samples_ms: Sequence[float] | np.ndarray,
              percentiles: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """count, mean, std (population), min, max and the given percentiles (keys ``p50`` ...)."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no samples to summarize")
    out: dict[str, float] = {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }
    for q, value in zip(percentiles, np.percentile(arr, list(percentiles)), strict=True):
        out[f"p{q:g}"] = float(value)
    return out
