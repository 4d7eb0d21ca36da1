"""Accuracy of any backend on a bundle's split, through the lead's evaluator.

``kiln.train.evaluate.evaluate_backend`` is the one implementation of top-1/top-5 and mAP; export,
calibration and the comparison table only choose the headline number from what it returns.
"""

from __future__ import annotations

from typing import Any

from kiln.bundle import Bundle

HEADLINE = {"classify": "top1", "detect": "map"}
# The budget is in points (percent). Top-1 comes in percent; mAP comes as pycocotools' fraction.
POINTS_PER_UNIT = {"classify": 1.0, "detect": 100.0}


def evaluate(bundle: Bundle, backend: Any, split: str = "val", limit: int | None = None) -> dict[str, float]:
    """``{"top1", "top5"}`` (percent) for classification, ``{"map", "map50"}`` (fractions, pycocotools) for detection."""
    from kiln.train.evaluate import evaluate_backend

    return numeric(evaluate_backend(bundle, backend, split=split, limit=limit))


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics only (drops per-class lists and the confusion matrix)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def headline(bundle: Bundle, metrics: dict[str, float]) -> tuple[str, float]:
    """The metric the accuracy budget is measured in: top-1 or mAP@[.5:.95], in points (percent)."""
    task = bundle.manifest.task
    key = HEADLINE[task]
    return key, float(metrics[key]) * POINTS_PER_UNIT[task]

