"""Detection metrics and reports for ``kiln eval`` and :func:`kiln.train.evaluate.evaluate_backend`.

Works from any backend's raw outputs (``boxes [N, A, 4]``, ``scores [N, A, C]``), post-processed by
:func:`kiln.processing.detect_postprocess`, the same numpy code serving runs, and scored by pycocotools.
mAP uses a low score threshold (:data:`~kiln.train.detect.metrics.EVAL_SCORE_THRESHOLD`, as COCO
evaluation does) and the bundle's NMS IoU threshold; the PNG grid shows what serving would return
(the bundle's own score threshold).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from kiln.bundle import Bundle, DetectPost
from kiln.fsutil import atomic_path, atomic_write_json, atomic_write_text
from kiln.processing import detect_postprocess
from kiln.train.data import ImageDataset
from kiln.train.detect.metrics import EVAL_MAX_DETECTIONS, EVAL_SCORE_THRESHOLD, coco_map, coco_results

GRID_IMAGES = 16
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def _raw(bundle: Bundle, res: Any) -> tuple[np.ndarray, np.ndarray]:
    names = [o.name for o in bundle.manifest.outputs]
    if len(names) != 2 or any(n not in res.outputs for n in names):
        raise ValueError(f"a detector has outputs [boxes, scores]; kiln.json lists {names}, the backend gave {sorted(res.outputs)}")
    return res.outputs[names[0]], res.outputs[names[1]]


def _detections(bundle: Bundle, res: Any, post: DetectPost) -> list[list[dict[str, Any]]]:
    boxes, scores = _raw(bundle, res)
    return detect_postprocess(boxes, scores, list(res.letterboxes), post, bundle.manifest.classes)


def eval_post(bundle: Bundle) -> DetectPost:
    return bundle.manifest.detect_post().model_copy(
        update={"score_threshold": EVAL_SCORE_THRESHOLD, "max_detections": EVAL_MAX_DETECTIONS})


def detection_metrics(bundle: Bundle, res: Any, ds: ImageDataset) -> dict[str, Any]:
    """``map`` (mAP@[.5:.95]), ``map50``, ``map75``, ``per_class_ap`` {class: AP or None}, ``count``."""
    dets = _detections(bundle, res, eval_post(bundle))
    return coco_map(dets, res.targets, bundle.manifest.classes)


def write_detect_reports(bundle: Bundle, res: Any, ds: ImageDataset, metrics: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """predictions.json (COCO results), per_class_ap.csv and predictions.png (a grid of val images with
    predicted boxes in colour and ground truth in white) in ``out_dir``."""
    out_dir = Path(out_dir)
    n = len(res.targets)
    ids = ds.info.get("image_ids")
    image_ids = list(ids[:n]) if ids is not None and len(ids) >= n else None
    cats = ds.info.get("category_ids")
    preds = coco_results(_detections(bundle, res, eval_post(bundle)), image_ids, cats)
    atomic_write_json(out_dir / "predictions.json", preds)

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class", "ap_50_95", "ground_truth_boxes"])
    counts: dict[int, int] = {}
    for t in res.targets:
        for lab in np.asarray(t["labels"]).reshape(-1):
            counts[int(lab)] = counts.get(int(lab), 0) + 1
    for k, name in enumerate(bundle.manifest.classes):
        ap = metrics.get("per_class_ap", {}).get(name)
        w.writerow([name, "" if ap is None else f"{ap:.4f}", counts.get(k, 0)])
    atomic_write_text(out_dir / "per_class_ap.csv", buf.getvalue())

    shown = min(GRID_IMAGES, n)
    serving = _detections(bundle, _First(res, shown), bundle.manifest.detect_post())
    grid = draw_grid([ds.image(i) for i in range(shown)], [res.targets[i] for i in range(shown)], serving,
                     bundle.manifest.classes, title=f"mAP@[.5:.95] {metrics.get('map', 0):.3f}  mAP@.5 {metrics.get('map50', 0):.3f}")
    with atomic_path(out_dir / "predictions.png") as tmp:
        grid.save(tmp, format="PNG")
    return {"predictions_json": str(out_dir / "predictions.json"), "per_class_ap_csv": str(out_dir / "per_class_ap.csv"),
            "predictions_png": str(out_dir / "predictions.png")}


class _First:
    """The first ``k`` images of a SplitOutputs."""

    def __init__(self, res: Any, k: int) -> None:
        self.outputs = {name: v[:k] for name, v in res.outputs.items()}
        self.letterboxes = list(res.letterboxes)[:k]
        self.targets = list(res.targets)[:k]


def draw_grid(images: list[Image.Image], targets: list[dict[str, np.ndarray]], detections: list[list[dict[str, Any]]],
              classes: list[str], title: str = "", cell: int = 256) -> Image.Image:
    """A square-ish grid of ``images`` with ground truth (white, thin) and detections (class colour)."""
    cols = max(1, int(np.ceil(np.sqrt(len(images)))))
    rows = max(1, int(np.ceil(len(images) / cols)))
    top = 18 if title else 0
    sheet = Image.new("RGB", (cols * cell, rows * cell + top), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill=(255, 255, 255))
    for i, (img, tgt, dets) in enumerate(zip(images, targets, detections, strict=True)):
        scale = min(cell / img.width, cell / img.height)
        tile = img.convert("RGB").resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        ox, oy = (i % cols) * cell, (i // cols) * cell + top
        sheet.paste(tile, (ox, oy))
        for box in np.asarray(tgt["boxes"]).reshape(-1, 4):
            draw.rectangle([ox + box[0] * scale, oy + box[1] * scale, ox + box[2] * scale, oy + box[3] * scale],
                           outline=(255, 255, 255), width=1)
        for d in dets:
            x1, y1, x2, y2 = d["box"]
            colour = COLOURS[d["index"] % len(COLOURS)]
            draw.rectangle([ox + x1 * scale, oy + y1 * scale, ox + x2 * scale, oy + y2 * scale], outline=colour, width=2)
            draw.text((ox + x1 * scale + 2, oy + y1 * scale + 1), f"{classes[d['index']]} {d['score']:.2f}", fill=colour)
    return sheet
