"""Backend outputs to the JSON-able per-image result that `kiln predict` prints and the server returns.

One function for both, so the command line and the REST answer agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln import processing
from kiln.bundle import ClassifyPost, DetectPost, Manifest
from kiln.processing import Letterbox


def predictions(
    manifest: Manifest, outputs: dict[str, np.ndarray], letterboxes: list[Letterbox], top_k: int | None = None,
    detect: DetectPost | None = None,
) -> list[dict[str, Any]]:
    """Per image ``{"width", "height", "top_k": [...]}`` (classify) or ``{..., "boxes": [...]}`` (detect).

    ``outputs`` are the backend's ``[N, ...]`` arrays; ``letterboxes`` map boxes back to original pixels.
    ``detect`` replaces kiln.json's detection controls (build it with
    :func:`kiln.processing.detect_overrides`); ``top_k`` only applies to classification.
    """
    if manifest.task == "classify":
        post = ClassifyPost(top_k=top_k) if top_k else manifest.classify_post()
        ranked = processing.classify_topk(outputs[manifest.outputs[0].name], manifest.classes, post)
        return [{"width": b.width, "height": b.height, "top_k": r} for r, b in zip(ranked, letterboxes, strict=True)]
    names = [o.name for o in manifest.outputs]
    boxes = outputs["boxes" if "boxes" in outputs else names[0]]
    scores = outputs["scores" if "scores" in outputs else names[1]]
    found = processing.detect_postprocess(boxes, scores, letterboxes, detect or manifest.detect_post(), manifest.classes)
    return [{"width": b.width, "height": b.height, "boxes": d} for d, b in zip(found, letterboxes, strict=True)]


__all__ = ["predictions"]
