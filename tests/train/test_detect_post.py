"""Detection post-processing (numpy, serving) agrees with the torch version (torchvision batched_nms),
and COCO mAP (pycocotools) behaves: perfect predictions score 1, shifted boxes less, none 0."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
import torch

from kiln.bundle import DetectPost
from kiln.metrics import coco_map
from kiln.processing import Letterbox, detect_postprocess, nms
from kiln.train.detect.post import detect_postprocess_torch

CLASSES = ["a", "b", "c"]


def _raw(rng: np.random.Generator, n: int, a: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.uniform(10, 118, size=(n, a, 2))
    sizes = rng.uniform(4, 40, size=(n, a, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], -1).astype(np.float32)
    # clusters of overlapping boxes so NMS has work to do
    boxes[:, 1::2] = boxes[:, ::2] + rng.uniform(-3, 3, size=boxes[:, ::2].shape).astype(np.float32)
    return boxes, rng.uniform(0, 1, size=(n, a, c)).astype(np.float32)


@pytest.mark.parametrize("post",
                         [DetectPost(),
                          DetectPost(score_threshold=0.05, iou_threshold=0.3, max_detections=20),
                                  DetectPost(score_threshold=0.9, iou_threshold=0.7, max_detections=5)])
def test_numpy_and_torch_postprocess_agree(post: DetectPost) -> None:
    rng = np.random.default_rng(0)
    boxes, scores = _raw(rng, 4, 300, 3)
    lbs = [Letterbox(0.5, 0.5, 0.0, 14.0, 256, 200), Letterbox(1.0, 1.0, 0.0, 0.0, 128, 128),
           Letterbox(2.0, 2.0, 8.0, 0.0, 56, 64), Letterbox(0.8, 0.8, 0.0, 16.0, 160, 120)]
    a = cast(list[list[dict[str, Any]]], detect_postprocess(boxes, scores, lbs, post, CLASSES))
    b = cast(list[list[dict[str, Any]]],
             detect_postprocess_torch(torch.from_numpy(boxes), torch.from_numpy(scores), lbs, post, CLASSES))
    assert sum(len(x) for x in a) > 4 * 2  # not trivially empty
    for da, db in zip(a, b, strict=True):
        assert len(da) == len(db) <= post.max_detections
        assert [d["index"] for d in da] == [d["index"] for d in db]
        assert [d["label"] for d in da] == [CLASSES[d["index"]] for d in da]
        assert np.allclose([d["score"] for d in da], [d["score"] for d in db])
        assert np.allclose([d["box"] for d in da], [d["box"] for d in db], atol=1e-4)
        scores_a = [d["score"] for d in da]
        assert scores_a == sorted(scores_a, reverse=True) and min(scores_a, default=1) > post.score_threshold


def test_nms_is_class_aware_and_maps_back() -> None:
    boxes = np.array([[[10, 10, 50, 50], [12, 12, 50, 50], [10, 10, 50, 50]]], dtype=np.float32)
    scores = np.array([[[0.9, 0.0], [0.8, 0.0], [0.0, 0.7]]], dtype=np.float32)
    lb = Letterbox(0.5, 0.5, 0.0, 10.0, 200, 100)
    [dets] = cast(list[list[dict[str, Any]]],
                  detect_postprocess(boxes, scores, [lb], DetectPost(), ["x", "y"]))
    # same box, other class kept
    assert [(d["label"], round(d["score"], 2)) for d in dets] == [("x", 0.9), ("y", 0.7)]
    assert np.allclose(dets[0]["box"], [20, 0, 100, 80])  # (box - pad) / scale, clipped to the image
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).size == 0


def _targets(rng: np.random.Generator, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        k = i % 4  # includes negative images
        xy = rng.uniform(0, 100, size=(k, 2))
        wh = rng.uniform(10, 50, size=(k, 2))
        out.append({"boxes": np.concatenate([xy, xy + wh], 1).astype(np.float32),
                    "labels": rng.integers(0, 3, k)})
    return out


def _as_dets(targets: list[dict[str, np.ndarray]], shift: float = 0.0) -> list[list[dict[str, Any]]]:
    return [[{"box": (b + shift).tolist(), "label": CLASSES[int(c)], "index": int(c), "score": 0.9}
             for b, c in zip(t["boxes"], t["labels"], strict=True)] for t in targets]


def test_coco_map() -> None:
    targets = _targets(np.random.default_rng(1), 12)
    perfect = coco_map(_as_dets(targets), targets, CLASSES)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map50"] == pytest.approx(1.0)
    present = {int(c) for t in targets for c in t["labels"]}
    assert all((ap == pytest.approx(1.0)) if CLASSES.index(k) in present
               else ap is None for k, ap in perfect["per_class_ap"].items())
    shifted = coco_map(_as_dets(targets, 4.0), targets, CLASSES)
    assert 0.0 < shifted["map"] < perfect["map"] and shifted["map50"] > shifted["map"]
    assert coco_map([[] for _ in targets], targets, CLASSES)["map"] == 0.0
    wrong = [[{**d, "index": (d["index"] + 1) % 3} for d in dets] for dets in _as_dets(targets)]
    assert coco_map(wrong, targets, CLASSES)["map"] < 0.05  # the class must match too
