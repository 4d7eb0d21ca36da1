"""Input statistics both tasks compute from a sample of training images (normalization mean/std)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def channel_stats(unit_images: Sequence[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``[C, H, W]`` images in [0, 1]: zero-centred inputs make INT8 work."""
    stack = np.stack(list(unit_images)).astype(np.float64)
    axes = (0, 2, 3)
    mean = stack.mean(axis=axes)
    std = np.maximum(stack.std(axis=axes), 1e-3)
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).permutation(n)[: min(n, k)].tolist())
