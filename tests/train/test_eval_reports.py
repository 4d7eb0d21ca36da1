"""The files `kiln eval` writes for a detector: pycocotools gets kiln's mAP back from them alone."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from kiln.bundle import Architecture, Bundle, InputSpec, Manifest, Preprocess, TensorSpec
from kiln.data import ImageDataset
from kiln.evaluate import SplitOutputs, split_metrics
from kiln.processing import Letterbox
from kiln.train.reports import write_detect_reports


def detector(root: Path) -> Bundle:
    root.mkdir(parents=True)
    b = Bundle(root, Manifest(
        kiln_version="0.1.0", task="detect", classes=["circle", "square"],
        input=InputSpec(name="images", shape=[3, 64, 64], batch={"min": 1, "opt": 4, "max": 8}),
        outputs=[TensorSpec(name="boxes", shape=[6, 4]), TensorSpec(name="scores", shape=[6, 2])],
        preprocess=Preprocess(mode="letterbox", size=(64, 64), channels="RGB", mean=[0, 0, 0], std=[1, 1, 1]),
        postprocess={"score_threshold": 0.3, "iou_threshold": 0.5, "max_detections": 10},
        architecture=Architecture(name="kiln-det-s", args={"num_classes": 2}),
    ))
    b.save()
    return b


def noisy_split(n: int = 5, anchors: int = 6, seed: int = 0) -> tuple[SplitOutputs,
                                                                      list[dict[str, np.ndarray]]]:
    """Outputs near the ground truth with some misses and false positives, so mAP is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    targets, boxes, scores = [], np.zeros((n, anchors, 4), np.float32), rng.uniform(0, 0.2, (n, anchors, 2))
    for i in range(n):
        gt = np.array([[4, 4, 30, 30], [34, 30, 60, 58]], np.float32) + rng.uniform(-3, 3, (2, 4)).astype(
            np.float32
        )
        labels = np.array([i % 2, 1], np.int64)
        targets.append({"boxes": gt, "labels": labels})
        for a in range(anchors):
            src = gt[a % 2] + rng.normal(0, 2.5, 4).astype(np.float32)
            boxes[i, a] = src
            scores[i, a, labels[a % 2] if a < 4 else 1 - labels[a % 2]] = rng.uniform(0.35, 0.95)
    lbs = [Letterbox(1.0, 1.0, 0.0, 0.0, 64, 64)] * n
    return SplitOutputs({"boxes": boxes, "scores": scores.astype(np.float32)}, targets, lbs), targets


def test_pycocotools_reproduces_kiln_map_from_the_written_files(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    bundle = detector(tmp_path / "b")
    res, targets = noisy_split()
    # ids as a COCO file on disk has them (`kiln data shapes`, any COCO dataset): not 1..N by position
    ds = ImageDataset(name="t", split="val", task="detect", classes=["circle", "square"], channels="RGB",
                      images=np.zeros((5, 64, 64, 3), np.uint8), targets=targets,
                      info={"image_ids": [17, 4, 99, 23, 8], "category_ids": [3, 7]})
    metrics = split_metrics(bundle, res, ds)
    assert 0.05 < metrics["map"] < 0.95
    files = write_detect_reports(bundle, res, ds, metrics, tmp_path / "out")
    assert Path(files["ground_truth_json"]).name == "ground_truth.json"
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {p["image_id"] for p in preds} <= {17, 4, 99, 23, 8} and {p["category_id"] for p in preds} <= {
        3,
        7,
    }

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "out" / "ground_truth.json"))
        dt = gt.loadRes(str(tmp_path / "out" / "predictions.json"))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(metrics["map"], abs=1e-9)
    assert ev.stats[1] == pytest.approx(metrics["map50"], abs=1e-9)
