"""Statistics of a run: input mean/std from a sample of training images, and the validation-at-chance
check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


def chance_warning(history: Sequence[dict[str, Any]], val_counts: Sequence[int], *, final: bool,
                   precise_bn: bool = True, data: str = "DATA") -> str | None:
    """A warning that names the problem when validation top-1 sits at chance, else None.

    Chance is the share of the largest class in the validation split (what predicting one class
    scores); "at" it means within two binomial standard deviations (at least 3 points) over the last
    three epochs. During a run it fires only when training accuracy has meanwhile climbed 15 points
    above chance (the model learns something that does not carry over); at the last epoch it fires on
    validation alone (nothing was learned).
    """
    n = int(sum(val_counts))
    rows = [r for r in history if "val_top1" in r]
    if n == 0 or len(rows) < (2 if final else 3):
        return None
    p = max(val_counts) / n
    chance = 100.0 * p
    band = chance + max(3.0, 200.0 * math.sqrt(p * (1 - p) / n))
    recent = [float(r["val_top1"]) for r in rows[-3:]]
    if float(np.median(recent)) > band:
        return None
    train_acc = float(rows[-1].get("train_acc", 0.0))
    climbed = train_acc >= chance + 15.0
    if not (climbed or final):
        return None
    shown = ", ".join(f"{v:.1f}" for v in recent)
    head = (
        f"validation top-1 sits at chance ({chance:.1f}% for {len(val_counts)} classes; last epochs "
        f"{shown}%)")
    fixes = ("--pretrained (start from ImageNet features), --image-size near the images' own size, a smaller "
             "--batch-size, more --epochs")
    if not precise_bn:
        fixes = "drop --no-precise-bn (BatchNorm statistics re-estimated before validation), " + fixes
    if climbed:
        return (f"{head} while training accuracy climbed to {train_acc:.1f}%: what the model learns does not "
                "carry over to the validation images. Check that the labels match the images and that train "
                f"and val come from the same source (kiln data inspect {data} --save DIR shows a contact "
                f"sheet per class); then try {fixes}")
    return (f"{head} and training accuracy is {train_acc:.1f}%: nothing was learned. Check that the labels "
            f"match the images (kiln data inspect {data} --save DIR shows a contact sheet per class); then "
            f"try --lr (lower when the loss jumps, higher when it stays flat), {fixes}")
