import json
from pathlib import Path

import pytest

from kiln.bundle import BatchRange, Bundle
from kiln.errors import BundleError
from kiln.fsutil import atomic_write, atomic_write_json


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


def test_roundtrip_and_sha(digits_bundle: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(digits_bundle, copy)
    b = Bundle.load(copy)
    assert b.manifest.task == "classify" and b.manifest.input.shape == [1, 28, 28]
    art = b.artifact("torch")
    assert art is not None and b.verify_artifact(art) == copy / "model.pt"
    b.manifest.evaluation["note"] = "x"
    b.save()
    assert Bundle.load(copy).manifest.evaluation["note"] == "x"
    (copy / "model.pt").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="sha256"):
        b.verify_artifact(art)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
