"""Export of a detector (kiln-det-s on shapes): same detections after post-processing, int8 mAP recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.bundle import Bundle
from kiln.cli import main


@pytest.fixture
def det_bundle(det_master: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KILN_SHAPES_COUNT", "48")
    return Path(shutil.copytree(det_master, tmp_path / "shapes"))


def test_detector_fp32_export_gives_the_same_detections(det_bundle: Path) -> None:
    assert main(["export", str(det_bundle), "--precision", "fp32", "--batch", "1:2:4", "--no-simplify"]) == 0
    fp32 = Bundle.load(det_bundle).manifest.artifacts["model.onnx"]
    v = fp32.model_dump()["verification"]
    assert v["passed"] and v["detections"] > 0 and v["missing"] == 0 and v["extra"] == 0
    assert v["max_box_diff_px"] <= 0.5
    assert "map" in fp32.metrics and "map50" in fp32.metrics


@pytest.mark.slow
def test_detector_int8_records_map(det_bundle: Path) -> None:
    assert main(["export", str(det_bundle), "--precision", "fp32,int8", "--calib-images", "16",
                 "--calib-method", "minmax", "--max-accuracy-drop", "5", "--batch", "1:2:4"]) == 0
    b = Bundle.load(det_bundle)
    int8 = b.manifest.artifacts["model.int8.onnx"]
    extra = int8.model_dump()
    assert "map" in int8.metrics and extra["calibration"]["images"] == 16
    v = extra["verification"]
    assert v["detections"] > 0 and v["max_accuracy_drop"] == 5
    assert v["accuracy_drop"] <= 5  # mAP points against the fp32 ONNX


def test_eval_detection_controls_write_aside_from_the_reference(det_bundle: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = json.loads((det_bundle / "kiln.json").read_text()).get("evaluation", {})
    assert (
        main(["eval", str(det_bundle), "--conf", "0.05", "--max-det", "1", "--single-label", "--no-table"])
        == 0
    )
    out_dirs = list((det_bundle / "eval").iterdir())
    assert len(out_dirs) == 1 and "conf0.05" in out_dirs[0].name and "max_det1" in out_dirs[0].name
    preds = json.loads((out_dirs[0] / "predictions.json").read_text())
    per_image: dict[int, int] = {}
    for p in preds:
        assert p["score"] >= 0.05
        per_image[p["image_id"]] = per_image.get(p["image_id"], 0) + 1
    assert all(n <= 1 for n in per_image.values())
    # A result under other controls is not the bundle's reference.
    assert json.loads((det_bundle / "kiln.json").read_text()).get("evaluation", {}) == before


def test_eval_detection_control_out_of_range_is_one_line(det_bundle: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(det_bundle), "--iou", "1.5", "--no-table"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "iou" in err[0], err
