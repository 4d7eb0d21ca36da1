"""`kiln predict` with the runtime replaced by the fake backend (the real load() is tested in tests/runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import kiln.runtime
from kiln.bundle import Bundle
from kiln.cli import main

from .conftest import FakeBackend, png


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(bundle: Bundle, backend: str = "auto", precision: str | None = None) -> FakeBackend:
        return FakeBackend(bundle if isinstance(bundle, Bundle) else Bundle.load(bundle), max_batch=2)

    monkeypatch.setattr(kiln.runtime, "load", load)


def test_predict_classify_text_json_and_save(
    classify_bundle: Bundle, tmp_path: Path, fake_runtime: None, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for i, value in enumerate((0, 255, 128)):  # 3 images with max batch 2: two backend calls
        p = tmp_path / f"img{i}.png"
        p.write_bytes(png(value=value))
        paths.append(str(p))
    assert main(["predict", str(classify_bundle.root), *paths, "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split()[0] for line in out] == ["0", "9", "5"]
    assert main(["predict", str(classify_bundle.root), *paths, "--json", "--save", str(tmp_path / "out")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend"] == "fake" and len(doc["predictions"]) == 3
    assert len(doc["predictions"][0]["top_k"]) == 3  # kiln.json's top_k
    saved = Image.open(tmp_path / "out" / "img1.png")
    assert saved.size == (252, 252)  # 28 px upscaled 9x so the label is legible


def test_predict_detect_draws_boxes(
    detect_bundle: Bundle, tmp_path: Path, fake_runtime: None, capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "scene.png"
    img.write_bytes(png("RGB", (128, 64), (0, 0, 0)))
    assert main(["predict", str(detect_bundle.root), str(img), "--save", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "scene.png: 2 object(s)" in out and "circle" in out and "square" in out
    drawn = Image.open(tmp_path / "out" / "scene.png").convert("RGB")
    assert drawn.getpixel((16 * 2, 30 * 2)) != (0, 0, 0)  # the box outline was drawn (image upscaled 2x)


def test_predict_bad_image_is_one_line(classify_bundle: Bundle, tmp_path: Path, fake_runtime: None,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(classify_bundle.root), str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"kiln predict: error: {bad}: not an image: the data is not in a format PIL can read"
    assert main(["predict", str(classify_bundle.root), str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
