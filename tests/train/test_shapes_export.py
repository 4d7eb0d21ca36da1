"""`kiln data shapes --format coco|yolo`: files other tools load as written, and ground truth they can
match."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kiln.cli import main
from kiln.data import ImageDataset, open_dataset
from kiln.train.reports import write_detect_reports

from .test_eval_reports import detector, noisy_split


def test_yolo_data_yaml_names_its_own_folder_from_any_directory(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["data", "shapes", "--format", "yolo", "--out", str(tmp_path / "y"), "--count", "10"]) == 0
    cfg = yaml.safe_load((tmp_path / "y" / "data.yaml").read_text())
    # Ultralytics resolves a relative `path` against its datasets folder, so it must be absolute
    assert Path(cfg["path"]).is_absolute() and Path(cfg["path"]) == (tmp_path / "y").resolve()
    assert (Path(cfg["path"]) / cfg["train"]).is_dir() and (Path(cfg["path"]) / cfg["val"]).is_dir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train, val = open_dataset(f"yolo:{tmp_path / 'y' / 'data.yaml'}")
    assert len(train) + len(val) == 10 and train.classes == list(cfg["names"].values())


def needs_ultralytics() -> None:
    """Skip without Ultralytics, which is only ever imported in a child process: importing it replaces
    PIL's ``Image.open`` process-wide (an unreadable file then fails on a missing ``pi_heif`` instead of
    PIL's own error), which would change what every later test in this process sees."""
    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("needs ultralytics (the dev extra)")


def _ultralytics(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with Ultralytics offline (no download, no pip), its settings in
    ``cwd``."""
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False",
           "YOLO_CONFIG_DIR": str(cwd / "cfg"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                          text=True,
                          timeout=900)


CHECK = """
import json, sys
from ultralytics.data.utils import check_det_dataset
data = check_det_dataset(sys.argv[1])
print(json.dumps({"names": data["names"], "nc": data["nc"], "train": str(data["train"]),
                  "val": str(data["val"])}))
"""


def test_yolo_data_yaml_passes_ultralytics_dataset_check_from_another_directory(tmp_path: Path) -> None:
    needs_ultralytics()
    assert main(["data", "shapes", "--format", "yolo", "--out", str(tmp_path / "y"), "--count", "10"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for given in (str(tmp_path / "y" / "data.yaml"), "../y/data.yaml"):  # absolute, and relative to the cwd
        proc = _ultralytics(CHECK, given, cwd=elsewhere)
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (
            data["nc"] == 3
            and list(data["names"].values())
            == open_dataset(f"yolo:{tmp_path / 'y' / 'data.yaml'}")[0].classes
        )
        assert Path(data["train"]) == (tmp_path / "y" / "images" / "train").resolve()
        assert Path(data["val"]) == (tmp_path / "y" / "images" / "val").resolve()


TRAIN = """
import sys
from ultralytics import YOLO
YOLO("yolov8n.yaml").train(data=sys.argv[1], epochs=1, imgsz=64, batch=8, device="cpu", workers=0,
                           project=sys.argv[2], name="run", plots=False, verbose=False)
"""


@pytest.mark.slow
def test_yolo_data_yaml_trains_in_ultralytics_offline(tmp_path: Path) -> None:
    needs_ultralytics()
    assert main(["data", "shapes", "--format", "yolo", "--out", str(tmp_path / "y"), "--count", "24"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _ultralytics(TRAIN, str(tmp_path / "y" / "data.yaml"), str(tmp_path / "runs"), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "runs" / "run" / "weights" / "last.pt").is_file()


def test_shapes_format_coco_is_the_default(tmp_path: Path) -> None:
    assert main(["data", "shapes", "--out", str(tmp_path / "c"), "--count", "10"]) == 0
    assert (tmp_path / "c" / "annotations" / "instances_train.json").is_file()
    with pytest.raises(SystemExit) as stop:
        main(["data", "shapes", "--format", "voc", "--out", str(tmp_path / "v")])
    assert stop.value.code == 2


def test_ground_truth_json_names_each_image_file(tmp_path: Path) -> None:
    bundle = detector(tmp_path / "b")
    res, targets = noisy_split(n=3)
    images = tmp_path / "images"
    ds = ImageDataset(name="coco", split="val", task="detect", classes=["circle", "square"], channels="RGB",
                      images=[images / "a.png", images / "sub" / "b.png", images / "c.png"], targets=targets,
                      info={"images": str(images), "image_ids": [5, 6, 7], "category_ids": [1, 2]})
    from kiln.evaluate import split_metrics

    metrics = split_metrics(bundle, res, ds)
    from PIL import Image

    (images / "sub").mkdir(parents=True)
    for p in ds.images:
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(p)
    write_detect_reports(bundle, res, ds, metrics, tmp_path / "out")
    gt = json.loads((tmp_path / "out" / "ground_truth.json").read_text())
    assert [(im["id"], im["file_name"]) for im in gt["images"]] == [
        (5, "a.png"),
        (6, "sub/b.png"),
        (7, "c.png"),
    ]
