"""`kiln export` / `kiln calibrate` through kiln.cli.main: int8 end to end, engines, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.bundle import Bundle
from kiln.cli import main
from kiln.fsutil import sha256_file


def snapshot(root: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in root.iterdir() if p.is_file()}


def test_int8_export_records_calibration(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", str(exported), "--precision", "int8", "--calib-images", "32", "--calib-method",
               "minmax",
               "--max-accuracy-drop", "5", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    (art,) = summary["artifacts"]  # fp32 was fresh, so only int8 was written
    assert art["precision"] == "int8" and art["path"].endswith("model.int8.onnx")
    assert art["calibration"]["method"] == "minmax" and art["calibration"]["images"] == 32
    assert art["verification"]["passed"] is True
    b = Bundle.load(exported)
    int8 = b.manifest.artifacts["model.int8.onnx"]
    fp32 = b.manifest.artifacts["model.onnx"]
    assert fp32.metrics["top1"] - int8.metrics["top1"] <= 5.0
    assert (exported / int8.model_dump()["calibration_report"]).is_file()


def test_calibrate_rejects_out_of_order_batch_range(exported: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(exported)
    with pytest.raises(SystemExit) as info:
        main(["export", str(exported), "--batch", "8:4:32"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MIN <= OPT <= MAX" in err
    with pytest.raises(SystemExit):
        main(["calibrate", str(exported), "--batch", "1:64:32"])
    assert snapshot(exported) == before


@pytest.mark.parametrize("what", ["missing", "no-model", "no-manifest"])
def test_folder_without_model_is_one_line_error(tmp_path: Path, exported: Path, what: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    if what == "missing":
        target = tmp_path / "nope"
    elif what == "no-model":
        (exported / "model.pt").unlink()
        target = exported
    else:
        target = tmp_path / "empty"
        target.mkdir()
    before = snapshot(target) if target.exists() else {}
    assert main(["export", str(target), "--precision", "fp32,fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kiln export: error:")
    assert (snapshot(target) if target.exists() else {}) == before


def _trt_usable() -> bool:
    from kiln.runtime.tensorrt import unavailable_reason

    return unavailable_reason() is None


@pytest.mark.skipif(_trt_usable(), reason="TensorRT and a GPU are usable here")
def test_engine_without_tensorrt_fails_before_any_work(bundle_copy: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(bundle_copy)
    assert main(["export", str(bundle_copy), "--engine", "--no-simplify"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "tensorrt" in line.lower() and "pip install '.[trt]'" in line
    assert snapshot(bundle_copy) == before  # nothing exported: the requirement was checked first
