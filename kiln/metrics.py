"""Accuracy metrics from numpy outputs: classification top-1/top-5 and COCO box mAP.

Training-time validation, ``kiln eval``, export and calibration all score with these functions, so
their numbers agree. COCO mAP goes through pycocotools: image ids are ``index + 1`` and category ids
``class index + 1`` (pycocotools treats 0 as "unmatched").
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.bundle import Bundle, DetectPost

HEADLINE = {"classify": "top1", "detect": "map"}
# The budget is in points (percent). Top-1 comes in percent; mAP comes as pycocotools' fraction.
POINTS_PER_UNIT = {"classify": 1.0, "detect": 100.0}
EVAL_SCORE_THRESHOLD = 0.01  # COCO mAP integrates over all scores: keep low-confidence detections
EVAL_MAX_DETECTIONS = 100  # COCO's maxDets for mAP


def map_post(post: DetectPost) -> DetectPost:
    """``post`` (its NMS IoU) as mAP is scored, in training and in ``kiln eval`` alike: COCO's low score
    threshold and detection cap, every class over the threshold per box, no class filter."""
    return post.model_copy(update={"score_threshold": EVAL_SCORE_THRESHOLD,
                                   "max_detections": EVAL_MAX_DETECTIONS,
                                   "multi_label": True, "class_agnostic": False, "classes": None})


def coco_ground_truth(targets: Sequence[dict[str, np.ndarray]], classes: Sequence[str],
                      sizes: Sequence[tuple[int, int]] | None = None, image_ids: Sequence[int] | None = None,
                      category_ids: Sequence[int] | None = None,
                      file_names: Sequence[str] | None = None) -> dict[str, Any]:
    """A COCO instances dict for ``targets`` (boxes in original pixels); ``sizes`` are ``(W, H)``;
    ``file_names`` (each image's ``file_name``) let other tools match their predictions to the images.

    Ids default to ``index + 1``; pass the dataset's own (as :func:`coco_results` takes them) to write
    a ground truth that results with those ids load against.
    """
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i, t in enumerate(targets):
        w, h = sizes[i] if sizes is not None else (0, 0)
        image_id = int(image_ids[i]) if image_ids is not None else i + 1
        images.append({"id": image_id, "width": int(w), "height": int(h),
                       **({"file_name": str(file_names[i])} if file_names is not None else {})})
        labels = np.asarray(t["labels"]).reshape(-1)
        # iscrowd marks objects the evaluation ignores (VOC "difficult"): not a miss, and no false positive
        crowd = np.asarray(t.get("iscrowd", np.zeros(len(labels)))).reshape(-1)
        for box, label, ignored in zip(np.asarray(t["boxes"]).reshape(-1, 4), labels, crowd, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            cat = int(category_ids[int(label)]) if category_ids is not None else int(label) + 1
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "iscrowd": int(ignored)})
    cats = [{"id": int(category_ids[i]) if category_ids is not None else i + 1, "name": str(n)}
            for i, n in enumerate(classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def coco_results(detections: Sequence[Sequence[dict[str, Any]]], image_ids: Sequence[int] | None = None,
                 category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Detections (per image, from detect_postprocess) as a COCO results list (``bbox`` = x, y, w, h)."""
    out = []
    for i, dets in enumerate(detections):
        image_id = image_ids[i] if image_ids is not None else i + 1
        for d in dets:
            x1, y1, x2, y2 = d["box"]
            cat = category_ids[d["index"]] if category_ids is not None else d["index"] + 1
            out.append({"image_id": int(image_id), "category_id": int(cat),
                        "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                        "score": round(float(d["score"]), 5)})
    return out


def coco_map(detections: Sequence[Sequence[dict[str, Any]]], targets: Sequence[dict[str, np.ndarray]],
             classes: Sequence[str]) -> dict[str, Any]:
    """``{"map", "map50", "map75", "per_class_ap": {class: AP or None}, "count"}`` (AP in [0, 1]).

    A class without ground truth in the split has AP None. With no detection at all every AP is 0.
    """
    # pycocotools ships with the train extra; core must import without it
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} detection lists for {len(targets)} images")
    results = coco_results(detections)
    present = {int(lab) for t in targets for lab in np.asarray(t["labels"]).reshape(-1)}
    base = {"map": 0.0, "map50": 0.0, "map75": 0.0, "count": len(targets), "detections": len(results)}
    if not results or not present:
        return {**base, "per_class_ap": {c: (0.0 if i in present else None) for i, c in enumerate(classes)}}
    quiet = io.StringIO()  # pycocotools prints progress and the summary table on stdout
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = coco_ground_truth(targets, classes)
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, EVAL_MAX_DETECTIONS]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxdets]; -1 = no ground truth
    per_class: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        p = precision[:, :, k, 0, -1]
        per_class[str(name)] = float(p[p > -1].mean()) if k in present and (p > -1).any() else None
    return {**base, "map": max(0.0, float(ev.stats[0])), "map50": max(0.0, float(ev.stats[1])),
            "map75": max(0.0, float(ev.stats[2])), "per_class_ap": per_class}


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """top-1 / top-5 accuracy (percent), per-class accuracy and the confusion matrix ``[true, pred]``."""
    labels = labels.astype(np.int64)
    pred = logits.argmax(1)
    k = min(5, logits.shape[1])
    topk = np.argsort(-logits, axis=1)[:, :k]
    n = max(1, len(labels))
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {
        "top1": 100.0 * float((pred == labels).sum()) / n,
        "top5": 100.0 * float((topk == labels[:, None]).any(1).sum()) / n,
        "per_class": [100.0 * float(v) for v in per_class],
        "confusion": confusion,
        "count": int(len(labels)),
    }


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics only (drops per-class lists and the confusion matrix)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def headline(bundle: Bundle, metrics: dict[str, float]) -> tuple[str, float]:
    """The metric the accuracy budget is measured in: top-1 or mAP@[.5:.95], in points (percent)."""
    task = bundle.manifest.task
    key = HEADLINE[task]
    return key, float(metrics[key]) * POINTS_PER_UNIT[task]
