"""Evaluation of any :class:`~kiln.runtime.base.Backend` on a bundle's dataset split.

The images go through :func:`kiln.processing.preprocess` exactly as in serving, so the numbers here are
what the endpoint will deliver. ``kiln eval`` writes the fp32 reference into kiln.json; export and
calibration call :func:`evaluate` to measure every precision variant the same way. Detection outputs
(``boxes [N, A, 4]``, ``scores [N, A, C]``) are post-processed by :func:`kiln.processing.detect_postprocess`,
the numpy code serving runs, and scored by :func:`kiln.metrics.coco_map` with a low score threshold
(:data:`~kiln.metrics.EVAL_SCORE_THRESHOLD`, as COCO evaluation does) and the bundle's NMS IoU threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.bundle import Bundle, DetectPost
from kiln.data import ImageDataset, open_dataset
from kiln.errors import DatasetError
from kiln.metrics import classification_metrics, coco_map, map_post, numeric
from kiln.processing import detect_overrides, detect_postprocess, preprocess
from kiln.runtime.base import Backend, pad_batch

log = logging.getLogger("kiln.eval")

SPLITS = ("train", "val")


def bundle_split(bundle: Bundle, split: str = "val", data: str | None = None) -> ImageDataset:
    """The bundle's own train/val split (as recorded at training time), or ``data``'s with the same
    classes."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}' (use train or val)")
    training = bundle.manifest.training
    spec = data or training.get("data")
    if not spec:
        raise DatasetError(f"{bundle.root}/kiln.json does not record its dataset; pass --data")
    skip_bad = bool(training.get("config", {}).get("skip_bad_images", False))
    train, val = open_dataset(spec, val_fraction=float(training.get("val_fraction", 0.2)),
                              seed=int(training.get("seed", 0)), skip_bad_images=skip_bad)
    ds = val if split == "val" else train
    if ds.classes != bundle.manifest.classes:
        raise DatasetError(
            f"--data {spec} has classes {ds.classes[:6]}... but the model was trained on "
            f"{bundle.manifest.classes[:6]}..."
        )
    return ds


@dataclass
class SplitOutputs:
    """Raw model outputs over a split (``name -> [N, ...]``), with the targets and placements."""

    outputs: dict[str, np.ndarray]
    targets: list[Any]
    letterboxes: list[Any]

    def first(self, k: int) -> SplitOutputs:
        """The first ``k`` images only."""
        return SplitOutputs({name: v[:k] for name, v in self.outputs.items()}, list(self.targets)[:k],
                            list(self.letterboxes)[:k])


def batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def run_split(bundle: Bundle, backend: Backend, dataset: ImageDataset, limit: int | None = None,
              batch_size: int | None = None) -> SplitOutputs:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    bs = max(backend.min_batch, min(batch_size or 32, backend.max_batch))
    name = bundle.manifest.input.name
    chunks: dict[str, list[np.ndarray]] = {}
    boxes: list[Any] = []
    for idx in batches(n, bs):
        x, lb = preprocess([dataset.image(i, bundle.manifest.preprocess) for i in idx],
                           bundle.manifest.preprocess)
        real = len(x)
        feeds, _ = pad_batch({name: x}, backend.min_batch)
        out = backend.infer(feeds)
        for k, v in out.items():
            chunks.setdefault(k, []).append(v[:real])
        boxes.extend(lb)
    outputs = {k: np.concatenate(v) for k, v in chunks.items()}
    return SplitOutputs(outputs, [dataset.target(i) for i in range(n)], boxes)


def evaluate_backend(bundle: Bundle | str, backend: Backend, split: str = "val", limit: int | None = None,
                     data: str | None = None) -> dict[str, Any]:
    """Accuracy (classify: top1/top5 percent) or mAP (detect: map, map50) of ``backend`` on a split."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    ds = bundle_split(b, split, data)
    return split_metrics(b, run_split(b, backend, ds, limit), ds)


def evaluate(bundle: Bundle, backend: Backend, split: str = "val",
             limit: int | None = None) -> dict[str, float]:
    """The scalar metrics of :func:`evaluate_backend`: ``{"top1", "top5"}`` (percent) for classification,
    ``{"map", "map50", ...}`` (fractions, pycocotools) for detection."""
    return numeric(evaluate_backend(bundle, backend, split=split, limit=limit))


def split_metrics(bundle: Bundle, res: SplitOutputs, dataset: ImageDataset,
                  post: DetectPost | None = None) -> dict[str, Any]:
    """The task's metrics of outputs already computed over ``dataset`` (see :func:`run_split`);
    ``post``: detection post-processing (default :func:`eval_post`)."""
    if bundle.manifest.task == "detect":
        return detection_metrics(bundle, res, post)
    logits = res.outputs[bundle.manifest.outputs[0].name]
    return classification_metrics(logits, np.asarray(res.targets), len(bundle.manifest.classes))


def eval_post(bundle: Bundle, **controls: Any) -> DetectPost:
    """Detection post-processing for mAP: the bundle's NMS IoU with COCO evaluation's score threshold and
    detection cap, every class over the threshold per box (as mAP protocols score), no class filter;
    ``controls`` (``conf``, ``iou``, ``max_det``, ``agnostic``, ``multi_label``, ``only``, see
    :func:`kiln.processing.detect_overrides`) override that."""
    base = map_post(bundle.manifest.detect_post())
    given = {k: v for k, v in controls.items() if v is not None}
    return detect_overrides(base, bundle.manifest.classes, **given) if given else base


def detections(bundle: Bundle, res: SplitOutputs, post: DetectPost) -> list[list[dict[str, Any]]]:
    """Per image, the detections serving would return from ``res`` under ``post``."""
    names = [o.name for o in bundle.manifest.outputs]
    if len(names) != 2 or any(n not in res.outputs for n in names):
        raise ValueError(
            f"a detector has outputs [boxes, scores]; kiln.json lists {names}, the backend gave "
            f"{sorted(res.outputs)}")
    return detect_postprocess(res.outputs[names[0]], res.outputs[names[1]], list(res.letterboxes), post,
                              bundle.manifest.classes)


def detection_metrics(bundle: Bundle, res: SplitOutputs, post: DetectPost | None = None) -> dict[str, Any]:
    """``map`` (mAP@[.5:.95]), ``map50``, ``map75``, ``per_class_ap`` {class: AP or None}, ``count``."""
    return coco_map(detections(bundle, res, post or eval_post(bundle)), res.targets, bundle.manifest.classes)


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items()}
