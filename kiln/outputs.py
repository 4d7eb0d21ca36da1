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
    manifest: Manifest, outputs: dict[str, np.ndarray], letterboxes: list[Letterbox],
    top_k: int | None = None, detect: DetectPost | None = None,
) -> list[dict[str, Any]]:
    """Per image ``{"width", "height", "top_k": [...]}`` (classify) or ``{..., "boxes": [...]}`` (detect).

    ``outputs`` are the backend's ``[N, ...]`` arrays; ``letterboxes`` map boxes back to original pixels.
    ``detect`` replaces kiln.json's detection controls (build it with
    :func:`kiln.processing.detect_overrides`); ``top_k`` only applies to classification.
    """
    if manifest.task == "classify":
        post = ClassifyPost(top_k=top_k) if top_k else manifest.classify_post()
        ranked = processing.classify_topk(outputs[manifest.outputs[0].name], manifest.classes, post)
        return [{"width": b.width, "height": b.height, "top_k": r}
                for r, b in zip(ranked, letterboxes, strict=True)]
    if outputs.keys() >= END_TO_END_OUTPUTS:
        found = end_to_end_detections(outputs, letterboxes, manifest.classes, detect, baked_nms(manifest),
                                      manifest.detect_post())
        return [{"width": b.width, "height": b.height, "boxes": d}
                for d, b in zip(found, letterboxes, strict=True)]
    names = [o.name for o in manifest.outputs]
    boxes = outputs["boxes" if "boxes" in outputs else names[0]]
    scores = outputs["scores" if "scores" in outputs else names[1]]
    found = processing.detect_postprocess(boxes, scores, letterboxes, detect or manifest.detect_post(),
                                          manifest.classes)
    return [
        {"width": b.width, "height": b.height, "boxes": d} for d, b in zip(found, letterboxes, strict=True)]


# What a detector graph with NMS inside answers (``kiln export --nms``, EfficientNMS's names).
END_TO_END_OUTPUTS = frozenset({"num_dets", "det_boxes", "det_scores", "det_classes"})


def end_to_end_detections(
    outputs: dict[str, np.ndarray], letterboxes: list[Letterbox] | None, classes: list[str],
    detect: DetectPost | None = None, baked: DetectPost | None = None, defaults: DetectPost | None = None,
) -> list[list[dict[str, Any]]]:
    """Detections per image from an end-to-end graph's outputs, as :func:`kiln.processing.detect_postprocess`
    gives them from the raw ones.

    ``num_dets [N, 1]``, ``det_boxes [N, K, 4]`` (xyxy, input pixels), ``det_scores [N, K]``,
    ``det_classes [N, K]`` -> per image the first ``num_dets`` rows, best first, boxes mapped to original
    pixels with each image's :class:`Letterbox` (left in input pixels when ``letterboxes`` is None).
    NMS ran in the graph with its own settings (``baked``, see :func:`baked_nms`); ``detect`` (kiln.json's
    ``defaults`` with a caller's controls) may only narrow them: a higher score threshold, fewer
    detections, a class filter. A control left at its default takes the graph's value. Anything the graph
    cannot give (a lower threshold, another IoU, multi-label, another NMS mode) raises
    :class:`~kiln.processing.DetectControlError`.
    """
    num, boxes = outputs["num_dets"], outputs["det_boxes"]
    scores, labels = outputs["det_scores"], outputs["det_classes"]
    if letterboxes is not None and len(letterboxes) != len(num):
        raise ValueError(f"{len(letterboxes)} letterboxes for {len(num)} images")
    keep_classes = None
    if detect is not None and baked is not None:
        asked = detect.model_dump()
        if defaults is not None:  # a control at kiln.json's default was not asked for: the graph's value
            base, own = defaults.model_dump(), baked.model_dump()
            asked = {k: own[k] if v == base[k] and k in own else v for k, v in asked.items()}
        detect = DetectPost.model_validate(asked)
        _check_narrows(detect, baked)
    if detect is not None:
        keep_classes = None if detect.classes is None else np.asarray(detect.classes, dtype=np.int64)
    out: list[list[dict[str, Any]]] = []
    for i in range(len(num)):
        n = int(num[i].reshape(-1)[0])
        b, s, c = (boxes[i, :n].astype(np.float32), scores[i, :n].astype(np.float32),
                   labels[i, :n].astype(np.int64))
        if detect is not None:
            keep = s > detect.score_threshold
            if keep_classes is not None:
                keep &= np.isin(c, keep_classes)
            idx = np.flatnonzero(keep)[: detect.max_detections]
            b, s, c = b[idx], s[idx], c[idx]
        if letterboxes is not None:
            b = letterboxes[i].to_original(b)
        out.append([{"box": [float(v) for v in box], "label": classes[int(k)], "index": int(k),
                     "score": float(sc)}
                    for box, k, sc in zip(b, c, s, strict=True)])
    return out


def baked_nms(manifest: Manifest) -> DetectPost | None:
    """The NMS settings inside the bundle's end-to-end graphs (kiln.json ``artifacts.*.nms``), or None."""
    for art in manifest.artifacts.values():
        if nms := art.nms:
            return DetectPost(score_threshold=nms.score_threshold, iou_threshold=nms.iou_threshold,
                              max_detections=nms.max_detections, class_agnostic=nms.class_agnostic)
    return None


def _check_narrows(detect: DetectPost, baked: DetectPost) -> None:
    """Raise when ``detect`` asks an end-to-end graph for what its baked-in NMS cannot give."""
    fixed = []
    if detect.score_threshold < baked.score_threshold:
        fixed.append(f"conf below {baked.score_threshold}")
    if detect.iou_threshold != baked.iou_threshold:
        fixed.append(f"iou other than {baked.iou_threshold}")
    if detect.max_detections > baked.max_detections:
        fixed.append(f"max_det above {baked.max_detections}")
    if detect.class_agnostic != baked.class_agnostic:
        fixed.append(f"agnostic {str(not baked.class_agnostic).lower()}")
    if detect.multi_label:
        fixed.append("multi_label")
    if detect.classes is not None and baked.class_agnostic:
        fixed.append("a class filter with class-agnostic NMS")
    if fixed:
        raise processing.DetectControlError(
            "this model runs NMS inside its graph (kiln export --nms); it cannot answer " + ", ".join(fixed)
            + " (serve the raw graph for that)")


__all__ = ["END_TO_END_OUTPUTS", "baked_nms", "end_to_end_detections", "predictions"]
