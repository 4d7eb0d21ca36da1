"""The artifact table `kiln eval` prints."""

from __future__ import annotations

from pathlib import Path

from kiln.bundle import Bundle
from kiln.compare import artifact_table, format_table


def test_table_covers_every_artifact(exported: Path) -> None:
    b = Bundle.load(exported)
    (exported / "model.fp32.engine").write_bytes(b"not an engine")
    b.add_artifact("model.fp32.engine", "tensorrt", "fp32", tensorrt_version="10.0.0", gpu_name="none",
                   compute_capability="0.0")
    b.save()
    rows = {r["file"]: r for r in artifact_table(exported, limit=64)}
    assert set(rows) == {"model.pt", "model.onnx", "model.fp16.onnx", "model.fp32.engine"}
    assert rows["model.pt"]["max_abs_diff"] == 0 and rows["model.pt"]["agreement"] == 100.0
    assert rows["model.onnx"]["max_abs_diff"] <= 1e-4 and rows["model.onnx"]["agreement"] == 100.0
    assert 0 < rows["model.fp16.onnx"]["max_abs_diff"] < 0.1
    assert rows["model.onnx"]["metrics"]["top1"] == rows["model.pt"]["metrics"]["top1"]
    assert "error" in rows["model.fp32.engine"]
    text = format_table(list(rows.values()))
    assert "model.fp16.onnx" in text and "not runnable" in text and "top1 agree %" in text
