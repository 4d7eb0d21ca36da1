"""The files ``kiln eval`` writes beside the numbers: confusion matrix and per-class accuracy for
classification; COCO predictions with the ground truth they were scored against, per-class AP and a
grid of predicted boxes for detection.

The metrics themselves come from :mod:`kiln.evaluate`, shared with export and calibration; the PNG grid
shows what serving would return (the bundle's own score threshold).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from kiln.bundle import Bundle, DetectPost
from kiln.data import ImageDataset
from kiln.evaluate import SplitOutputs, detections, eval_post
from kiln.figures import new_figure, save_figure
from kiln.fsutil import atomic_path, atomic_write_json, atomic_write_text
from kiln.metrics import coco_ground_truth, coco_results

GRID_IMAGES = 16
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def write_classify_reports(bundle: Bundle, metrics: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """confusion.csv, confusion.png and per_class.csv in ``out_dir``."""
    classes = bundle.manifest.classes
    cm: np.ndarray = metrics["confusion"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, cm, strict=True):
        w.writerow([name, *row.tolist()])
    atomic_write_text(out_dir / "confusion.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["class", "accuracy_percent", "images"])
    for name, acc, count in zip(classes, metrics["per_class"], cm.sum(1), strict=True):
        w.writerow([name, f"{acc:.2f}", int(count)])
    atomic_write_text(out_dir / "per_class.csv", buf.getvalue())

    k = len(classes)
    fig = new_figure(figsize=(max(4, 0.45 * k + 2), max(3.5, 0.45 * k + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title=f"confusion matrix (top-1 {metrics['top1']:.2f}%)")
    ax.set_xticklabels(classes, rotation=90 if k > 10 else 0)
    ax.set_yticklabels(classes)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, out_dir / "confusion.png", dpi=100)
    return {"confusion_csv": str(out_dir / "confusion.csv"), "confusion_png": str(out_dir / "confusion.png"),
            "per_class_csv": str(out_dir / "per_class.csv")}


def _file_names(ds: ImageDataset, n: int) -> list[str] | None:
    """Each image's ``file_name`` as COCO writes it: relative to the images folder when the dataset
    names one (COCO, the shapes export), else the file's own path; None for in-memory images."""
    if isinstance(ds.images, np.ndarray):
        return None
    root = ds.info.get("images")
    out = []
    for p in list(ds.images)[:n]:
        path = Path(p)
        try:
            out.append(str(path.relative_to(root)) if root else str(path))
        except ValueError:
            out.append(str(path))
    return out


def write_detect_reports(bundle: Bundle, res: SplitOutputs, ds: ImageDataset, metrics: dict[str, Any],
                         out_dir: Path,
                         post: DetectPost | None = None) -> dict[str, str]:
    """predictions.json (COCO results), ground_truth.json (the COCO ground truth they were scored
    against, with the same image and category ids), per_class_ap.csv and predictions.png (a grid of val
    images with predicted boxes in colour and ground truth in white) in ``out_dir``.

    pycocotools reproduces kiln's mAP from the two JSON files alone: ``COCO("ground_truth.json")``,
    ``loadRes("predictions.json")``, ``COCOeval(gt, dt, "bbox")``.
    """
    out_dir = Path(out_dir)
    n = len(res.targets)
    ids = ds.info.get("image_ids")
    image_ids = list(ids[:n]) if ids is not None and len(ids) >= n else None
    cats = ds.info.get("category_ids")
    preds = coco_results(detections(bundle, res, post or eval_post(bundle)), image_ids, cats)
    atomic_write_json(out_dir / "predictions.json", preds)
    sizes = [(lb.width, lb.height) for lb in res.letterboxes]
    atomic_write_json(out_dir / "ground_truth.json",
                      coco_ground_truth(res.targets, bundle.manifest.classes, sizes, image_ids, cats,
                                        _file_names(ds, n)))

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
    serving = detections(bundle, res.first(shown), bundle.manifest.detect_post())
    grid = draw_grid([ds.image(i) for i in range(shown)], [res.targets[i] for i in range(shown)], serving,
                     bundle.manifest.classes,
                     title=f"mAP@[.5:.95] {metrics.get('map', 0):.3f}  mAP@.5 {metrics.get('map50', 0):.3f}")
    with atomic_path(out_dir / "predictions.png") as tmp:
        grid.save(tmp, format="PNG")
    return {"predictions_json": str(out_dir / "predictions.json"),
            "ground_truth_json": str(out_dir / "ground_truth.json"),
            "per_class_ap_csv": str(out_dir / "per_class_ap.csv"),
            "predictions_png": str(out_dir / "predictions.png")}


def draw_grid(images: list[Image.Image], targets: list[dict[str, np.ndarray]],
              detections: list[list[dict[str, Any]]],
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
        tile = img.convert("RGB").resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        ox, oy = (i % cols) * cell, (i // cols) * cell + top
        sheet.paste(tile, (ox, oy))
        for box in np.asarray(tgt["boxes"]).reshape(-1, 4):
            draw.rectangle([ox + box[0] * scale, oy + box[1] * scale, ox + box[2] * scale,
                            oy + box[3] * scale],
                           outline=(255, 255, 255), width=1)
        for d in dets:
            x1, y1, x2, y2 = d["box"]
            colour = COLOURS[d["index"] % len(COLOURS)]
            draw.rectangle([ox + x1 * scale, oy + y1 * scale, ox + x2 * scale, oy + y2 * scale],
                           outline=colour, width=2)
            draw.text((ox + x1 * scale + 2, oy + y1 * scale + 1), f"{classes[d['index']]} {d['score']:.2f}",
                      fill=colour)
    return sheet
