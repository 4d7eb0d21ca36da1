"""`kiln eval` says what it wrote, and `--bench` joins accuracy and speed per artifact in one table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.compare import format_speed_table, format_table


def test_eval_bench_table(digits_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "b"
    shutil.copytree(digits_bundle, run)
    assert main(["eval", str(run), "--bench", "--bench-iters", "2", "--bench-batch", "1,4", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    (row,) = out["artifacts"]  # the trained bundle holds model.pt only
    assert row["file"] == "model.pt" and row["size_mb"] == pytest.approx(
        (run / "model.pt").stat().st_size / 1e6
    )
    assert row["p50_ms_b1"] > 0 and row["items_per_s"] > 0 and row["best_batch"] in (1, 4)
    assert row["metrics"]["top1"] == out["metrics"]["top1"]
    err = captured.err
    header = next(line for line in err.splitlines() if "items/s (batch)" in line)
    assert header.split() == ["file", "format", "precision", "size", "MB", "top1", "%", "p50", "ms", "(b1)",
                              "items/s", "(batch)"]
    line = next(line for line in err.splitlines() if line.startswith("model.pt "))
    assert f"{out['metrics']['top1']:.2f}" in line and f"({row['best_batch']})" in line
    wrote = next(line for line in err.splitlines() if line.startswith("wrote "))
    for name in ("confusion.png", "confusion.csv", "per_class.csv"):
        assert str(run / name) in wrote


def test_tables_tell_close_maps_apart() -> None:
    rows = [{"file": f"model.{p}.onnx", "format": "onnx", "precision": p, "backend": "onnxrt",
             "device": "cpu",
             "size_mb": 1.5, "metrics": {"map": m, "map50": m + 0.1}, "agreement": 99.0, "max_abs_diff": 0.01,
             "p50_ms_b1": 1.0, "items_per_s": 900.0, "best_batch": 8}
            for p, m in (("fp32", 0.7648), ("int8", 0.7612))]
    rows.append({"file": "model.int8.engine", "format": "tensorrt", "precision": "int8",
                 "error": "no TensorRT"})
    text = format_table(rows, "detect")
    assert "76.48" in text and "76.12" in text and "mAP %" in text
    speed = format_speed_table(rows, "detect")
    assert (
        "76.48" in speed and "76.12" in speed and "900 (8)" in speed and "not runnable: no TensorRT" in speed
    )
