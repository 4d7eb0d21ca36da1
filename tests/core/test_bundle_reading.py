"""Bundle reading and artifact checks as a user meets them: the messages of a bad batch range, loading by
the kiln.json path, the first invalid field named with its full location, artifacts looked up by format
and precision, a missing or modified artifact named, and the post-processing read from kiln.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.bundle import (
    MANIFEST,
    Architecture,
    BatchRange,
    Bundle,
    InputSpec,
    Manifest,
    Preprocess,
    TensorSpec,
)
from kiln.errors import BundleError
from kiln.fsutil import sha256_file


def make(root: Path, **post: object) -> Bundle:
    root.mkdir(parents=True, exist_ok=True)
    b = Bundle(root, Manifest(
        kiln_version="0.1.0", task="classify", classes=["a", "b"],
        input=InputSpec(name="images", shape=[1, 8, 8]),
        outputs=[TensorSpec(name="logits", shape=[2])],
        preprocess=Preprocess(mode="resize", size=(8, 8), channels="L", mean=[0.5], std=[0.5]),
        postprocess=dict(post), architecture=Architecture(name="lenet5"),
    ))
    b.save()
    return b


def with_files(root: Path) -> Bundle:
    b = make(root)
    for name in ("model.pt", "model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        (root / name).write_bytes(name.encode())
    b.add_artifact("model.pt", "torch")
    b.add_artifact("model.onnx", "onnx")
    b.add_artifact("model.fp16.onnx", "onnx", "fp16")
    b.add_artifact("model.int8.onnx", "onnx", "int8", calibration={"method": "entropy"})
    return b


@pytest.mark.parametrize(("text", "message"), [
    ("a:b:c", "expected MIN:OPT:MAX with integers, got 'a:b:c'"),
    ("1:2", "expected MIN:OPT:MAX, got '1:2'"),
    ("0:1:2", "batch sizes must be >= 1, got '0:1:2'"),
    ("8:4:32", "batch range must satisfy MIN <= OPT <= MAX, got 8:4:32"),
    ("4:8:6", "batch range must satisfy MIN <= OPT <= MAX, got 4:8:6"),
    ("4:2:8", "batch range must satisfy MIN <= OPT <= MAX, got 4:2:8"),
])
def test_bad_batch_range_says_what_was_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        BatchRange.parse(text)
    assert str(info.value) == message


def test_load_by_the_kiln_json_path(tmp_path: Path) -> None:
    make(tmp_path / "b")
    loaded = Bundle.load(tmp_path / "b" / MANIFEST)
    assert loaded.root == tmp_path / "b" and loaded.manifest.classes == ["a", "b"]


def test_a_file_that_is_not_kiln_json_is_not_a_bundle(tmp_path: Path) -> None:
    make(tmp_path / "b")
    (tmp_path / "b" / "other.json").write_text("{}")
    with pytest.raises(BundleError, match="bundle folder not found"):
        Bundle.load(tmp_path / "b" / "other.json")


def test_invalid_manifest_names_the_first_bad_field_by_its_full_path(tmp_path: Path) -> None:
    make(tmp_path / "b")
    data = json.loads((tmp_path / "b" / MANIFEST).read_text())
    data["input"]["batch"]["min"] = 0
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError) as info:
        Bundle.load(tmp_path / "b")
    assert str(info.value).startswith(f"invalid {tmp_path / 'b' / MANIFEST}: input.batch.min: ")


def test_save_writes_json_that_loads_back(tmp_path: Path) -> None:
    b = make(tmp_path / "b")
    b.manifest.training["history"] = (1, 2)
    b.manifest.training["data"] = tmp_path / "digits"  # a path recorded as given: written as its text
    b.save()
    data = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert data["preprocess"]["size"] == [8, 8] and data["training"]["history"] == [1, 2]
    assert data["training"]["data"] == str(tmp_path / "digits")
    assert Bundle.load(tmp_path / "b").manifest == Bundle.load(tmp_path / "b" / MANIFEST).manifest


def test_artifacts_by_format_and_precision(tmp_path: Path) -> None:
    b = with_files(tmp_path / "b")
    assert [a.file for a in b.artifacts()] == ["model.pt", "model.onnx", "model.fp16.onnx", "model.int8.onnx"]
    assert [a.file for a in b.artifacts("onnx")] == ["model.onnx", "model.fp16.onnx", "model.int8.onnx"]
    assert [a.file for a in b.artifacts(precision="fp16")] == ["model.fp16.onnx"]
    assert [a.file for a in b.artifacts("torch", "fp16")] == []
    assert [a.file for a in b.artifacts("onnx", "fp32")] == ["model.onnx"]
    assert b.artifact("onnx").file == "model.onnx"
    assert b.artifact("onnx", "int8").file == "model.int8.onnx"
    assert b.artifact("torch", "int8") is None and b.artifact("tensorrt") is None


def test_added_artifact_records_precision_sha_and_extras(tmp_path: Path) -> None:
    b = with_files(tmp_path / "b")
    b.save()
    arts = Bundle.load(tmp_path / "b").manifest.artifacts
    assert arts["model.pt"].precision == "fp32" and arts["model.fp16.onnx"].precision == "fp16"
    assert arts["model.int8.onnx"].model_dump()["calibration"]["method"] == "entropy"
    assert arts["model.onnx"].sha256 == sha256_file(tmp_path / "b" / "model.onnx")
    assert b.path("model.onnx") == tmp_path / "b" / "model.onnx"


def test_verify_artifact_names_the_missing_file(tmp_path: Path) -> None:
    b = with_files(tmp_path / "b")
    (tmp_path / "b" / "model.onnx").unlink()
    with pytest.raises(BundleError) as info:
        b.verify_artifact(b.artifact("onnx"))
    assert str(info.value) == f"artifact model.onnx listed in kiln.json is missing from {tmp_path / 'b'}"


def test_post_processing_is_read_from_the_manifest(tmp_path: Path) -> None:
    assert make(tmp_path / "c", top_k=3).manifest.classify_post().top_k == 3
    post = make(tmp_path / "d", score_threshold=0.6, max_detections=7).manifest.detect_post()
    assert (post.score_threshold, post.max_detections) == (0.6, 7)


def test_verify_artifact_refuses_a_modified_file(tmp_path: Path) -> None:
    b = with_files(tmp_path / "b")
    assert b.verify_artifact(b.artifact("onnx")) == tmp_path / "b" / "model.onnx"
    (tmp_path / "b" / "model.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match=r"model\.onnx does not match its sha256 in kiln\.json"):
        b.verify_artifact(b.artifact("onnx"))


def test_batch_range_parse_and_order():
    assert str(BatchRange.parse("1:8:32")) == "1:8:32"
    assert BatchRange.parse("4") == BatchRange(min=4, opt=4, max=4)
    for bad in ("8:4:32", "1:64:32", "0:1:2", "a:b:c", "1:2"):
        with pytest.raises(ValueError):
            BatchRange.parse(bad)


def test_load_errors(tmp_path: Path):
    with pytest.raises(BundleError, match="not found"):
        Bundle.load(tmp_path / "nope")
    with pytest.raises(BundleError, match="kiln.json is missing"):
        Bundle.load(tmp_path)
    (tmp_path / "kiln.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        Bundle.load(tmp_path)
    (tmp_path / "kiln.json").write_text(json.dumps({"task": "segment"}))
    with pytest.raises(BundleError, match="invalid"):
        Bundle.load(tmp_path)
