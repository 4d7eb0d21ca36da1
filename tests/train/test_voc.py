"""Pascal VOC (``--data voc:ROOT``): the VOCdevkit layout, difficult objects ignored by mAP, and the same
bad-data handling as the COCO and YOLO readers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.data import dataset_task, open_dataset
from kiln.data.voc import VOC_CLASSES
from kiln.errors import DatasetError
from kiln.metrics import coco_map


def _obj(name: str, box: tuple[int, int, int, int], difficult: int = 0) -> str:
    x1, y1, x2, y2 = box
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )


def make_voc(root: Path, objects: dict[str, list[str]], split: dict[str, list[str]] | None = None) -> Path:
    """A VOC2012-like tree under ``root/VOCdevkit``: 64x48 JPEGs, one XML per image id."""
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objs in objects.items():
        Image.new("RGB", (64, 48), (30, 60, 90)).save(base / "JPEGImages" / f"{image_id}.jpg")
        (base / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>64</width><height>48</height><depth>3</depth>"
            f"</size>{''.join(objs)}</annotation>")
    for name, ids in (split or {"train": list(objects)[:2], "val": list(objects)[2:]}).items():
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root / "VOCdevkit"


def test_voc_splits_difficult_and_clipping(tmp_path: Path) -> None:
    root = make_voc(tmp_path, {
        "a": [_obj("dog", (1, 1, 20, 20))],
        "b": [_obj("cat", (10, 10, 90, 40))],  # reaches outside the 64 px wide image: clipped
        "c": [_obj("dog", (5, 5, 30, 30)), _obj("person", (40, 10, 60, 40), difficult=1)],
        "d": [],  # a negative image
    })
    assert dataset_task(f"voc:{root}") == "detect"
    train, val = open_dataset(f"voc:{root}")
    assert (len(train), len(val), train.classes[11]) == (2, 2, "dog")
    assert np.allclose(train.target(0)["boxes"], [[0, 0, 20, 20]])  # 1-based VOC pixels -> 0-based edges
    assert np.allclose(train.target(1)["boxes"], [[9, 9, 64, 40]]) and train.info["clipped_boxes"] == 1
    c = val.target(0)
    assert c["labels"].tolist() == [11, 14] and c["iscrowd"].tolist() == [0, 1]
    assert val.target(1)["boxes"].shape == (0, 4)

    def det(box: list[float], label: int, score: float) -> dict[str, object]:
        return {"box": box, "label": val.classes[label], "index": label, "score": score}

    found = [[det([4, 4, 30, 30], 11, 0.9)], []]
    # difficult not missed
    assert coco_map(found, [val.target(0), val.target(1)], val.classes)["map50"] == pytest.approx(1.0)
    found[0].append(det([39, 9, 60, 40], 14, 0.8))
    # nor a false positive
    assert coco_map(found, [val.target(0), val.target(1)], val.classes)["map50"] == pytest.approx(1.0)


def test_voc_without_split_files_and_custom_classes(tmp_path: Path) -> None:
    root = make_voc(tmp_path, {f"im{i}": [_obj("widget", (2, 2, 30, 30))] for i in range(5)}, split={})
    (root / "VOC2012" / "classes.txt").write_text("widget\ngadget\n")
    train, val = open_dataset(f"voc:{root / 'VOC2012'}", val_fraction=0.4)
    assert (len(train) + len(val), min(len(train), len(val)) >= 1, train.classes) == (
        5,
        True,
        ["widget", "gadget"],
    )


@pytest.mark.parametrize("case,expected", [
    ("unknown", r"1 object\(s\) for train have an unknown class name: .*a.xml 'unicorn'.*classes.txt"),
    ("missing", r"image\(s\) named by the train annotations do not exist: .*JPEGImages.*a.jpg"),
    ("badxml", r"b.xml:3: not valid XML"),
    ("nolist", r"annotation file\(s\) listed for val do not exist: .*zz.xml"),
])
def test_voc_bad_data_is_one_line(tmp_path: Path, case: str, expected: str) -> None:
    root = make_voc(tmp_path,
                    {"a": [_obj("unicorn" if case == "unknown" else "dog", (1, 1, 9, 9))], "b": [], "c": [],
                     "d": []})
    base = root / "VOC2012"
    if case == "unknown":  # a class list of one's own that the annotations do not follow
        (base / "classes.txt").write_text("dog\n")
    if case == "missing":
        (base / "JPEGImages" / "a.jpg").unlink()
    if case == "badxml":
        (base / "Annotations" / "b.xml").write_text(
            "<annotation>\n<filename>b.jpg</filename>\n<size><width>oops</annotation>"
        )
    if case == "nolist":
        (base / "ImageSets" / "Main" / "val.txt").write_text("c\nzz\n")
    with pytest.raises(DatasetError, match=expected) as err:
        open_dataset(f"voc:{root}")
    assert "\n" not in str(err.value)


def test_voc_classes_come_from_the_annotations_sorted_without_classes_txt(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A LabelImg/CVAT export: its own class names, no classes.txt; names of both splits, sorted."""
    root = make_voc(tmp_path, {"a": [_obj("widget", (2, 2, 30, 30)), _obj("bolt", (1, 1, 9, 9))],
                               "b": [_obj("widget", (3, 3, 20, 20))],
                               "c": [_obj("gear", (4, 4, 40, 40))], "d": []})
    with caplog.at_level(logging.INFO, logger="kiln.data.voc"):
        train, val = open_dataset(f"voc:{root}")
    assert train.classes == val.classes == ["bolt", "gear", "widget"]  # "gear" is in val only
    assert train.info["classes_from"] == "annotations"
    assert list(train.target(0)["labels"]) == [2, 0] and list(val.target(0)["labels"]) == [1]
    assert any(
        "3 class(es) read from the annotations (sorted): bolt, gear, widget" in m for m in caplog.messages
    )


def test_voc_class_names_all_of_voc_keep_the_canonical_20(tmp_path: Path) -> None:
    root = make_voc(tmp_path,
                    {"a": [_obj("tvmonitor", (2, 2, 30, 30))], "b": [_obj("aeroplane", (1, 1, 9, 9))],
                               "c": [_obj("dog", (4, 4, 40, 40))], "d": []})
    train, val = open_dataset(f"voc:{root}")
    assert train.classes == val.classes == VOC_CLASSES and len(VOC_CLASSES) == 20
    assert list(train.target(0)["labels"]) == [19] and list(val.target(0)["labels"]) == [11]


def test_voc_classes_txt_wins_over_the_annotations(tmp_path: Path) -> None:
    root = make_voc(tmp_path,
                    {"a": [_obj("widget", (2, 2, 30, 30))], "b": [], "c": [_obj("gear", (1, 1, 9, 9))],
                               "d": []})
    (root / "VOC2012" / "classes.txt").write_text("widget\ngear\nspare\n")
    train, _ = open_dataset(f"voc:{root}")
    assert train.classes == ["widget", "gear", "spare"] and train.info["classes_from"] == "classes.txt"


def test_voc_classes_from_annotations_reach_kiln_json(tmp_path: Path) -> None:
    """kiln train on a VOC export with its own classes: the bundle lists them in the annotations' order."""
    import json

    from kiln.train.config import TrainConfig
    from kiln.train.loop import train

    root = make_voc(tmp_path,
                    {f"im{i}": [_obj("widget" if i % 2 else "bolt", (2, 2, 30, 30))] for i in range(4)},
                    split={"train": ["im0", "im1"], "val": ["im2", "im3"]})
    out = tmp_path / "run"
    train(TrainConfig(data=f"voc:{root}", model="kiln-det-s", image_size=64, epochs=1, batch_size=2,
                      workers=0,
                      out=str(out)), progress=False)
    manifest = json.loads((out / "kiln.json").read_text())
    assert manifest["classes"] == ["bolt", "widget"]
    assert manifest["training"]["classes_from"] == "annotations"
