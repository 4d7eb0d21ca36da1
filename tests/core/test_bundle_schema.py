"""kiln.json's schema: closed, typed records, and bundles written by an older schema read through a
migration."""

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kiln.bundle import SCHEMA_VERSION, Artifact, Bundle, EngineProvenance
from kiln.errors import BundleError


def _schema1() -> dict[str, Any]:
    """A detector bundle's kiln.json as schema 1 wrote it: engine provenance flat in the artifact."""
    return {
        "schema_version": 1,
        "kiln_version": "0.9.0",
        "task": "detect",
        "classes": ["circle", "square"],
        "input": {"name": "images", "shape": [3, 64, 64], "dtype": "float32", "layout": "NCHW",
                  "batch": {"min": 1, "opt": 2, "max": 4}},
        "outputs": [{"name": "boxes", "shape": [84, 4]}, {"name": "scores", "shape": [84, 2]}],
        "preprocess": {"mode": "letterbox", "size": [64, 64], "mean": [0, 0, 0], "std": [1, 1, 1]},
        "postprocess": {"score_threshold": 0.25},
        "architecture": {"name": "kiln-det-s", "args": {}},
        "artifacts": {
            "model.onnx": {"file": "model.onnx", "format": "onnx", "precision": "fp32", "sha256": "a" * 64,
                           "opset": 20, "simplified": True, "source_sha256": "p" * 64,
                           "verification": {"passed": True}},
            "model.nms.onnx": {"file": "model.nms.onnx", "format": "onnx", "precision": "fp32",
                               "sha256": "n" * 64,
                               "nms": {"score_threshold": 0.3, "iou_threshold": 0.5, "max_detections": 10,
                                       "class_agnostic": True, "pre_nms_top_k": 1000},
                               "outputs": [{"name": "num_dets", "shape": [1], "dtype": "int32"}]},
            "model.fp16.engine": {"file": "model.fp16.engine", "format": "tensorrt", "precision": "fp16",
                                  "sha256": "e" * 64, "source_sha256": "a" * 64,
                                  "tensorrt_version": "10.13.0.35",
                                  "gpu_name": "NVIDIA L4", "compute_capability": "8.9",
                                  "profile": {"min": 1, "opt": 2, "max": 4}, "version_compat": True,
                                  "built_by": "an older kiln"},
        },
        "a_key_of_a_later_stage": {"x": 1},
    }


def _write(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kiln.json").write_text(json.dumps(data))
    return folder


def test_a_schema_1_bundle_loads_with_its_provenance_typed(tmp_path: Path) -> None:
    m = Bundle.load(_write(tmp_path / "old", _schema1())).manifest
    assert m.schema_version == SCHEMA_VERSION == 2
    engine = m.artifacts["model.fp16.engine"].engine
    assert isinstance(engine, EngineProvenance)
    assert (engine.tensorrt_version, engine.gpu_name, engine.compute_capability) == (
        "10.13.0.35",
        "NVIDIA L4",
        "8.9",
    )
    assert engine.version_compat is True and engine.hardware_compat is False and engine.profile is not None
    assert engine.profile.max == 4
    raw = m.artifacts["model.onnx"]
    assert raw.engine is None and raw.opset == 20 and raw.simplified is True and raw.source_sha256 == "p" * 64
    e2e = m.artifacts["model.nms.onnx"]
    assert e2e.nms is not None and e2e.nms.max_detections == 10 and e2e.nms.class_agnostic is True
    assert e2e.outputs is not None and e2e.outputs[0].name == "num_dets"
    assert m.preprocess.decode == "full"  # measured before decode modes existed


def test_a_migrated_bundle_is_saved_in_the_current_schema(tmp_path: Path) -> None:
    b = Bundle.load(_write(tmp_path / "old", _schema1()))
    b.save()
    saved = json.loads((tmp_path / "old" / "kiln.json").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION and "a_key_of_a_later_stage" not in saved
    engine = saved["artifacts"]["model.fp16.engine"]
    assert "tensorrt_version" not in engine and "built_by" not in engine
    assert engine["engine"]["gpu_name"] == "NVIDIA L4"
    assert "engine" not in saved["artifacts"]["model.onnx"]  # fields that do not apply are not written
    again = Bundle.load(tmp_path / "old").manifest
    assert again == b.manifest


def test_a_current_bundle_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    data = _schema1()
    Bundle.load(_write(tmp_path / "b", data)).save()
    current = json.loads((tmp_path / "b" / "kiln.json").read_text())
    current["artifacts"]["model.onnx"]["opsett"] = 20
    with pytest.raises(BundleError, match=r"artifacts\.model\.onnx\.opsett"):
        Bundle.load(_write(tmp_path / "b", current))


def test_a_newer_schema_is_refused_with_its_version(tmp_path: Path) -> None:
    data = dict(_schema1(), schema_version=SCHEMA_VERSION + 1)
    with pytest.raises(BundleError, match=f"schema_version {SCHEMA_VERSION + 1} is newer"):
        Bundle.load(_write(tmp_path / "new", data))


def test_artifacts_refuse_fields_they_do_not_define() -> None:
    with pytest.raises(ValidationError):
        Artifact.model_validate({"file": "m.onnx", "format": "onnx", "sha256": "x", "gpu": "none"})


def test_engine_provenance_given_flat_is_recorded_under_engine(tmp_path: Path) -> None:
    b = Bundle.load(_write(tmp_path / "b", _schema1()))
    (tmp_path / "b" / "model.fp32.engine").write_bytes(b"plan")
    art = b.add_artifact("model.fp32.engine", "tensorrt", "fp32", tensorrt_version="10.13.0.35",
                         gpu_name="NVIDIA L4", compute_capability="8.9", hardware_compat=True)
    assert (
        art.engine is not None and art.engine.hardware_compat is True and art.engine.gpu_name == "NVIDIA L4"
    )
