"""Artifacts made from an earlier model.onnx are unlisted when model.onnx changes."""

from pathlib import Path

from kiln.bundle import Artifact, Bundle
from kiln.export.pipeline import drop_stale_artifacts


def test_derived_artifacts_of_an_old_graph_are_unlisted(exported: Path) -> None:
    b = Bundle.load(exported)
    fp32 = b.manifest.artifacts["model.onnx"]
    b.manifest.artifacts["model.int8.onnx"] = Artifact.model_validate(
        {"file": "model.int8.onnx", "format": "onnx", "precision": "int8", "sha256": "i8",
         "source_sha256": "old-fp32"})
    b.manifest.artifacts["model.int8.engine"] = Artifact.model_validate(
        {"file": "model.int8.engine", "format": "tensorrt", "precision": "int8", "sha256": "e8",
         "source_sha256": "i8"})
    b.manifest.artifacts["model.fp16.onnx"] = Artifact.model_validate(
        {"file": "model.fp16.onnx", "format": "onnx", "precision": "fp16", "sha256": "f16",
         "source_sha256": fp32.sha256})
    assert sorted(drop_stale_artifacts(b)) == ["model.int8.engine", "model.int8.onnx"]
    kept = Bundle.load(exported).manifest.artifacts
    assert "model.fp16.onnx" in kept and "model.onnx" in kept and "model.pt" in kept
    assert "model.int8.onnx" not in kept and "model.int8.engine" not in kept
