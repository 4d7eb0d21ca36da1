"""`kiln data inspect` and kiln.data.inspect: every --data form, counts, sizes, skipped files, warnings,
the chosen input size and the contact sheet."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.cli import main
from kiln.data import OPENERS
from kiln.data.detect import write_shapes_coco, write_shapes_yolo
from kiln.data.inspect import data_image_size, inspect_dataset, steps_per_epoch, write_contact_sheet

from .test_voc import _obj, make_voc


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (40, 30)) -> None:
    rng = np.random.default_rng(0)
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )


def _every_form(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("KILN_SHAPES_COUNT", "30")
    rng = np.random.default_rng(0)
    mnist = tmp / "mnist"
    mnist.mkdir()
    for prefix, n in (("train", 20), ("t10k", 8)):
        (mnist / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 255, (n, 28, 28))))
        (mnist / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))
    cifar = tmp / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    with open(cifar / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": list(range(4))},
                        fh)
    _folder(tmp / "folder", {"cat": 6, "dog": 6})
    write_shapes_coco(tmp / "coco", count=20)
    coco = tmp / "coco"
    voc = make_voc(tmp / "voc", {"a": [_obj("dog", (1, 1, 20, 20))], "b": [_obj("cat", (5, 5, 30, 30))],
                                 "c": [_obj("dog", (2, 2, 9, 9)), _obj("cat", (3, 3, 40, 40))]})
    return {
        "digits": "digits",
        "mnist": f"mnist:{mnist}",
        "cifar10": f"cifar10:{tmp / 'cifar'}",
        "folder": f"folder:{tmp / 'folder'}",
        "shapes": "shapes",
        "coco": f"coco:{coco / 'annotations' / 'instances_train.json'}:{coco / 'images' / 'train'}",
        "yolo": f"yolo:{write_shapes_yolo(tmp / 'yolo', count=15)}",
        "voc": f"voc:{voc}",
    }


def test_inspect_runs_on_every_data_form(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forms = _every_form(tmp_path, monkeypatch)
    assert set(forms) == set(OPENERS)  # a new --data form must be added here
    for name, data in forms.items():
        s = inspect_dataset(data, batch_size=4)
        d = json.loads(s.to_json())  # JSON-serialisable as it is
        assert d["train"]["images"] == sum(d["train"]["per_class"].values()) or s.task == "detect", name
        assert s.train.images > 0 and s.val.images > 0, name
        assert s.steps_per_epoch == steps_per_epoch(s.train.images, 4), name
        assert s.train.sizes is not None and s.train.sizes.width[0] >= 1, name
        assert any("input size" in line for line in s.format()), name
    mnist = inspect_dataset(forms["mnist"])
    assert mnist.split_source == "the dataset's own val split" and mnist.train.sizes.format() == "all 28x28"
    assert inspect_dataset("digits").split_source == "val held out from the training images"
    shapes = inspect_dataset("shapes")
    assert shapes.input_size.size is None and shapes.train.boxes_per_class is not None
    assert sum(shapes.train.boxes_per_class.values()) >= shapes.train.images


def test_inspect_counts_sizes_and_skipped_files(tmp_path: Path) -> None:
    _folder(tmp_path / "set", {"big": 30, "small": 5}, size=(90, 60))
    Image.new("RGB", (200, 100)).save(tmp_path / "set" / "big" / "wide.png")
    (tmp_path / "set" / "small" / "broken.jpg").write_bytes(b"\xff\xd8\xffnot a jpeg")
    s = inspect_dataset(f"folder:{tmp_path / 'set'}", batch_size=8)
    assert s.train.per_class["big"] + s.val.per_class["big"] == 31
    assert s.train.per_class["small"] + s.val.per_class["small"] == 5
    assert [Path(k.path).name for k in s.skipped] == ["broken.jpg"]
    assert s.train.sizes is not None and s.train.sizes.width[2] <= 200 and s.train.sizes.height[1] == 60
    text = "\n".join(s.warnings)
    assert "class imbalance" in text and "'big'" in text
    assert "fewer than 10 training images in class(es) small" in text
    assert "unreadable" in text
    assert f"only {s.steps_per_epoch} optimizer step(s) per epoch at batch size 8" in text
    assert s.input_size.size == 64 and s.input_size.source == "data"  # median shorter side 60 -> 64


@pytest.mark.parametrize(("side", "expected"), [(64, 64), (20, 32), (100, 96), (427, 224)])
def test_folder_input_size_follows_the_images(tmp_path: Path, side: int, expected: int) -> None:
    _folder(tmp_path / "s", {"a": 3, "b": 3}, size=(side + 10, side))
    from kiln.data import open_dataset

    train, _ = open_dataset(f"folder:{tmp_path / 's'}", val_fraction=0.34)
    chosen = data_image_size(train)
    assert chosen is not None and chosen.size == expected and str(side) in chosen.reason


def test_cli_inspect_saves_sheet_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _folder(tmp_path / "set", {"cat": 12, "dog": 12})
    out = tmp_path / "report"
    assert (
        main(
            [
                "data",
                "inspect",
                f"folder:{tmp_path / 'set'}",
                "--save",
                str(out),
                "--json",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    saved = json.loads((out / "summary.json").read_text())
    assert printed == saved and saved["train"]["per_class"]["cat"] + saved["val"]["per_class"]["cat"] == 12
    assert "steps per epoch" not in captured.err and "optimizer step(s) per epoch" in captured.err
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.height >= 2 * 96  # a row per class
        assert sheet.width >= 8 * 96 or sheet.width >= 9 * 96 // 2


def test_contact_sheet_has_a_row_per_class_with_its_images(tmp_path: Path) -> None:
    root = tmp_path / "set"
    for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), colour).save(root / c / f"{i}.png")
    path = write_contact_sheet(f"folder:{root}", tmp_path / "sheet.png", per_class=3, thumb=48)
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    rows = [arr[4 + r * 52 + 24] for r in range(2)]  # the middle line of each row
    blue_row, red_row = rows  # classes are sorted: blue, red
    assert (np.abs(blue_row - [0, 0, 255]).sum(1) < 30).sum() >= 3 * 40
    assert (np.abs(red_row - [255, 0, 0]).sum(1) < 30).sum() >= 3 * 40
    assert (np.abs(blue_row - [255, 0, 0]).sum(1) < 30).sum() < 10  # no red image in the blue row


def test_cli_inspect_needs_a_dataset() -> None:
    assert main(["data", "inspect"]) == 2


def test_many_classes_print_the_largest_and_smallest(tmp_path: Path) -> None:
    _folder(tmp_path / "set", {f"c{i:02d}": 2 + i % 7 for i in range(30)}, size=(8, 8))
    s = inspect_dataset(f"folder:{tmp_path / 'set'}")
    lines = s.format()
    assert any("10 more classes" in line for line in lines)
    assert len([line for line in lines if line.startswith("  c") and not line.startswith("  class")]) == 20
    assert len(s.train.per_class) == 30
