"""A trained bundle saved, reloaded and checked against its artifacts' sha256; atomic writes."""

import json
from pathlib import Path

import pytest

from kiln.bundle import Bundle
from kiln.errors import BundleError
from kiln.fsutil import atomic_write, atomic_write_json


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
