"""Detection datasets: shapes, COCO and YOLO loaders, bad annotations and negative images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.data import open_dataset
from kiln.data.detect import (
    SHAPES_CLASSES,
    SHAPES_SIZE,
    make_shapes,
    open_coco,
    open_yolo,
    sanitize_boxes,
    write_shapes_yolo,
)
from kiln.errors import DatasetError


def test_shapes_are_deterministic_and_exact() -> None:
    a_img, a_t = make_shapes(12, seed=3)
    b_img, b_t = make_shapes(12, seed=3)
    c_img, _ = make_shapes(12, seed=4)
    assert np.array_equal(a_img, b_img)
    assert all(np.array_equal(x["boxes"], y["boxes"])
               and np.array_equal(x["labels"], y["labels"]) for x, y in zip(a_t, b_t, strict=True))
    assert not np.array_equal(a_img, c_img)
    h, w = SHAPES_SIZE
    for t in a_t:
        assert 1 <= len(t["labels"]) <= 6
        assert t["boxes"].dtype == np.float32 and t["labels"].dtype == np.int64
        b = t["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
        assert ((b[:, 2] - b[:, 0]) >= 16).all()
        assert set(t["labels"].tolist()) <= set(range(len(SHAPES_CLASSES)))
    # boxes are exact: the last-drawn object (never occluded) fills its box to the edges
    checked = 0
    for img, t in zip(*make_shapes(60, seed=3), strict=True):
        x1, y1, x2, y2 = (int(v) for v in t["boxes"][-1])
        inside = img[y1:y2, x1:x2].reshape(-1, 3)
        colour = img[(y1 + y2) // 2, (x1 + x2) // 2]
        if t["labels"][-1] == 1:  # square: every pixel of the box
            assert (inside == colour).all()
            outside = [img[y1:y2, x2], img[y1:y2, x1 - 1]] if x1 > 0 and x2 < img.shape[1] else []
            assert not any((edge == colour).all() for edge in outside)  # and not one pixel beyond
            checked += 1
        elif t["labels"][-1] == 0:  # circle: the middle row and column span the box exactly
            assert (img[(y1 + y2) // 2, x1:x2] == colour).all() and (
                img[y1:y2, (x1 + x2) // 2] == colour
            ).all()
            checked += 1
    assert checked >= 20


def test_open_shapes_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_SHAPES_COUNT", "30")
    train, val = open_dataset("shapes", val_fraction=0.2, seed=0)
    assert (len(train), len(val)) == (24, 6)
    assert train.task == val.task == "detect" and train.classes == SHAPES_CLASSES
    train2, _ = open_dataset("shapes", val_fraction=0.2, seed=1)
    # another split, same content
    assert not all(np.array_equal(train.image(i), train2.image(i)) for i in range(3))


def test_coco_round_trip_via_cli(tmp_path: Path) -> None:
    from kiln.cli import main

    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--count", "20", "--seed", "5"]) == 0
    root = tmp_path / "s"
    train, val = open_dataset(f"coco:{root}/annotations/instances_train.json:{root}/images/train")
    assert len(train) + len(val) == 20 and len(val) == 4  # val from instances_val.json beside it
    images, targets = make_shapes(20, seed=5)
    for ds in (train, val):
        assert ds.classes == SHAPES_CLASSES and ds.task == "detect"
        for k in range(len(ds)):
            i = int(Path(ds.images[k]).stem)
            assert np.array_equal(np.asarray(ds.image(k)), images[i])
            assert np.allclose(ds.target(k)["boxes"], targets[i]["boxes"])
            assert np.array_equal(ds.target(k)["labels"], targets[i]["labels"])


def test_yolo_folder(tmp_path: Path) -> None:
    yaml_path = write_shapes_yolo(tmp_path / "y", count=15, seed=2)
    train, val = open_dataset(f"yolo:{yaml_path}")
    assert len(train) + len(val) == 15 and train.classes == SHAPES_CLASSES
    _, targets = make_shapes(15, seed=2)
    for ds in (train, val):
        for k in range(len(ds)):
            i = int(Path(ds.images[k]).stem)
            assert np.allclose(ds.target(k)["boxes"], targets[i]["boxes"], atol=1e-3)
            assert np.array_equal(ds.target(k)["labels"], targets[i]["labels"])


def _coco(tmp_path: Path, anns: list[dict], n_images: int = 3, write: int | None = None) -> Path:
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    images = []
    for i in range(n_images):
        if write is None or i < write:
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(img_dir / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 40, "height": 30})
    path = tmp_path / "ann.json"
    cats = [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def _ann(i: int, image_id: int, cat: int, bbox: list[float]) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0}


def test_bad_boxes_clipped_and_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    anns = [_ann(1, 1, 1, [-5, 2, 20, 10]), _ann(2, 1, 7, [30, 20, 50, 50]), _ann(3, 2, 1, [5, 5, 0, 8]),
            _ann(4, 2, 7, [45, 5, 10, 10])]
    path = _coco(tmp_path, anns)
    with caplog.at_level(logging.INFO):
        train, val = open_coco(str(path), str(tmp_path / "img"), val_fraction=0.34, seed=0)
    everything = {Path(p).stem: t for ds in (train, val) for p, t in zip(ds.images, ds.targets, strict=True)}
    assert np.allclose(everything["0"]["boxes"], [[0, 2, 15, 12], [30, 20, 40, 30]])  # clipped to 40x30
    assert everything["0"]["labels"].tolist() == [0, 1]  # category ids 1, 7 -> class indices 0, 1
    assert len(everything["1"]["labels"]) == 0  # zero-width and fully-outside boxes dropped
    assert len(everything["2"]["labels"]) == 0  # no annotations: a valid negative image
    assert "dropped 2 degenerate box(es)" in caplog.text and "clipped 2 box(es)" in caplog.text


def test_sanitize_boxes() -> None:
    b, lab, clipped, dropped = sanitize_boxes(np.array([[-1, 0, 5, 5], [2, 2, 2.5, 9], [0, 0, 3, 3]]),
                                              np.array([0, 1, 2]), 4, 4)
    assert (
        np.allclose(b, [[0, 0, 4, 4], [0, 0, 3, 3]])
        and lab.tolist() == [0, 2]
        and (clipped, dropped) == (1, 1)
    )


def test_coco_errors_name_offenders(tmp_path: Path) -> None:
    path = _coco(tmp_path, [_ann(1, 1, 3, [0, 0, 5, 5]), _ann(2, 2, 99, [0, 0, 5, 5])])
    with pytest.raises(DatasetError,
                       match=r"2 annotation\(s\).*category_id out of range.*category_id 3.*category_id 99"):
        open_coco(str(path), str(tmp_path / "img"))
    path = _coco(tmp_path, [_ann(1, 42, 1, [0, 0, 5, 5])])
    with pytest.raises(DatasetError, match="name images that do not exist: annotation 1 -> image_id 42"):
        open_coco(str(path), str(tmp_path / "img"))
    for f in (tmp_path / "img").iterdir():
        f.unlink()
    path = _coco(tmp_path, [], write=1)
    with pytest.raises(DatasetError, match=r"2 image\(s\) listed in .* do not exist: .*1\.png"):
        open_coco(str(path), str(tmp_path / "img"))


def test_yolo_errors_and_negatives(tmp_path: Path) -> None:
    yaml_path = write_shapes_yolo(tmp_path / "y", count=10, seed=0)
    root = yaml_path.parent
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    labels[0].unlink()  # an image without a label file is a negative sample
    labels[1].write_text("")  # so is an empty label file
    train, _ = open_yolo(str(yaml_path))
    assert sum(len(t["labels"]) == 0 for t in train.targets) == 2
    labels[2].write_text("5 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DatasetError, match=r"class id out of range: .*:1 class 5.*Valid ids are 0..2"):
        open_yolo(str(yaml_path))
    labels[2].write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match=r"label file\(s\) for train have no image: .*ghost.txt"):
        open_yolo(str(yaml_path))
