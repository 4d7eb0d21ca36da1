"""Detection controls in kiln.processing (numpy) and their torch twin, and `kiln predict` with them:
one label per box by default, multi-label when asked, class-agnostic NMS, a class filter; inputs as
files, folders and globs; --save draws boxes best-on-top with a legend."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

import kiln.runtime
from kiln.bundle import Architecture, Bundle, DetectPost, InputSpec, Manifest, Preprocess, TensorSpec
from kiln.cli import main
from kiln.processing import DetectControlError, Letterbox, detect_overrides, detect_postprocess
from kiln.runtime.base import BaseBackend
from kiln.train.detect.post import detect_postprocess_torch

CLASSES = ["a", "b", "c"]


def _raw(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(10, 118, size=(3, 300, 2))
    sizes = rng.uniform(4, 40, size=(3, 300, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], -1).astype(np.float32)
    boxes[:, 1::2] = boxes[:, ::2] + rng.uniform(-3, 3, size=boxes[:, ::2].shape).astype(np.float32)
    return boxes, rng.uniform(0, 1, size=(3, 300, 3)).astype(np.float32)


POSTS = [DetectPost(class_agnostic=True), DetectPost(multi_label=True, score_threshold=0.3),
         DetectPost(classes=[0, 2], iou_threshold=0.3),
         DetectPost(multi_label=True, class_agnostic=True, classes=[1])]


@pytest.mark.parametrize("post", POSTS)
def test_numpy_and_torch_agree_on_every_control(post: DetectPost) -> None:
    boxes, scores = _raw(1)
    lbs = [Letterbox(1.0, 1.0, 0.0, 0.0, 128, 128)] * 3
    a = cast(list[list[dict[str, Any]]], detect_postprocess(boxes, scores, lbs, post, CLASSES))
    b = cast(list[list[dict[str, Any]]],
             detect_postprocess_torch(torch.from_numpy(boxes), torch.from_numpy(scores), lbs, post, CLASSES))
    assert sum(len(x) for x in a) > 3
    for da, db in zip(a, b, strict=True):
        assert [d["index"] for d in da] == [d["index"] for d in db]
        assert np.allclose([d["box"] for d in da], [d["box"] for d in db], atol=1e-4)
        if post.classes is not None:
            assert {d["index"] for d in da} <= set(post.classes)


def test_one_label_per_box_by_default() -> None:
    boxes = np.array([[[10, 10, 50, 50], [70, 70, 90, 90]]], dtype=np.float32)
    scores = np.array([[[0.9, 0.8, 0.7], [0.1, 0.6, 0.0]]], dtype=np.float32)
    [single] = detect_postprocess(boxes, scores, None, DetectPost(), CLASSES)
    assert [(d["label"], d["score"]) for d in single] == [
        ("a", pytest.approx(0.9)),
        ("b", pytest.approx(0.6)),
    ]
    [multi] = detect_postprocess(boxes, scores, None, DetectPost(multi_label=True), CLASSES)
    assert [d["label"] for d in multi] == ["a", "b", "c", "b"]
    [agnostic] = detect_postprocess(boxes, scores, None, DetectPost(multi_label=True, class_agnostic=True),
                                    CLASSES)
    assert [d["label"] for d in agnostic] == ["a", "b"]
    # the filter drops a box whose best class is not wanted; it does not relabel it as a weaker class
    [only_b] = detect_postprocess(boxes, scores, None, DetectPost(classes=[1]), CLASSES)
    assert [d["score"] for d in only_b] == [pytest.approx(0.6)]


def test_overrides_validate() -> None:
    base = DetectPost()
    post = detect_overrides(base, CLASSES, conf=0.5, iou=0.3, max_det=7, agnostic=True, only=["c", "0"])
    assert (
        post.score_threshold,
        post.iou_threshold,
        post.max_detections,
        post.class_agnostic,
        post.classes,
    ) == (0.5, 0.3, 7, True, [2, 0])
    assert detect_overrides(base, CLASSES) == base
    with pytest.raises(DetectControlError, match="conf"):
        detect_overrides(base, CLASSES, conf=1.5)
    with pytest.raises(DetectControlError, match="Did you mean 'b'"):
        detect_overrides(base, CLASSES, only=["bb"])


def test_old_manifest_postprocess_loads() -> None:
    post = DetectPost.model_validate({"score_threshold": 0.3, "iou_threshold": 0.5, "max_detections": 10})
    assert not post.multi_label and not post.class_agnostic and post.classes is None


# ---- kiln predict --------------------------------------------------------------------------------------

class _Fake(BaseBackend):
    """Two overlapping boxes scoring for both classes, one far box; a 64x64 letterboxed input."""

    def __init__(self, bundle: Bundle) -> None:
        m = bundle.manifest
        self.name, self.precision, self.device = "fake", "fp32", "cpu"
        self.inputs = [TensorSpec(name=m.input.name, shape=m.input.shape)]
        self.outputs = list(m.outputs)
        self.min_batch, self.max_batch = 1, 4

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = feeds["images"].shape[0]
        boxes = np.tile(np.array([[8, 8, 40, 40], [10, 10, 42, 42], [44, 44, 60, 60]], np.float32), (n, 1, 1))
        scores = np.tile(np.array([[0.9, 0.6], [0.8, 0.7], [0.2, 0.5]], np.float32), (n, 1, 1))
        return {"boxes": boxes, "scores": scores}

    def _close(self) -> None:
        pass


@pytest.fixture
def det_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bundle:
    bundle = Bundle(tmp_path / "det", Manifest(
        kiln_version="0.1.0", task="detect", classes=["circle", "square"],
        input=InputSpec(name="images", shape=[3, 64, 64]),
        outputs=[TensorSpec(name="boxes", shape=[3, 4]), TensorSpec(name="scores", shape=[3, 2])],
        preprocess=Preprocess(mode="letterbox", size=(64, 64), mean=[0, 0, 0], std=[1, 1, 1]),
        postprocess=DetectPost(score_threshold=0.3).model_dump(),
        architecture=Architecture(name="kiln-det-s", args={"num_classes": 2})))
    bundle.root.mkdir()
    bundle.save()
    monkeypatch.setattr(kiln.runtime, "load",
                        lambda b, backend="auto", precision=None:
                            _Fake(b if isinstance(b, Bundle) else Bundle.load(b)))
    return bundle


def _png(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 0, 0)).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["predict", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_controls_files_folders_globs(det_bundle: Bundle, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("x/1.png", "x/2.png", "y/deep/3.png"):
        _png(tmp_path / name)
    (tmp_path / "x" / "notes.txt").write_text("not an image")
    root = str(det_bundle.root)
    doc = _run(capsys, root, str(tmp_path / "x"), str(tmp_path / "y" / "**" / "*.png"))
    assert [Path(p["image"]).name for p in doc["predictions"]] == ["1.png", "2.png", "3.png"]
    assert [d["label"] for d in doc["predictions"][0]["boxes"]] == ["circle", "square"]  # best class per box
    doc = _run(capsys, root, str(tmp_path / "x" / "1.png"), "--conf", "0.55", "--multi-label", "--iou",
               "0.99")
    assert [d["label"] for d in doc["predictions"][0]["boxes"]] == ["circle", "circle", "square", "square"]
    doc = _run(capsys, root, str(tmp_path / "x" / "1.png"), "--multi-label", "--agnostic", "--max-det", "1")
    assert [d["label"] for d in doc["predictions"][0]["boxes"]] == ["circle"]
    doc = _run(capsys, root, str(tmp_path / "x" / "1.png"), "--classes", "square")
    assert [d["label"] for d in doc["predictions"][0]["boxes"]] == ["square"]
    assert main(["predict", root, str(tmp_path / "x" / "1.png"), "--classes", "hexagon"]) == 2
    assert "hexagon" in capsys.readouterr().err
    assert main(["predict", root, str(tmp_path / "x" / "1.png"), "--top-k", "1"]) == 2
    assert "--max-det" in capsys.readouterr().err
    assert main(["predict", root, str(tmp_path / "nothing" / "*.png")]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_predict_save_draws_best_on_top_with_legend(det_bundle: Bundle, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    img = _png(tmp_path / "small.png", (32, 32))  # letterboxed 2x into 64x64: boxes halve in original pixels
    assert (
        main(["predict", str(det_bundle.root), str(img), "--save", str(tmp_path / "out"), "--iou", "0.99"])
        == 0
    )
    assert f"saved 1 image(s) with their boxes to {tmp_path / 'out'}" in capsys.readouterr().err
    drawn = Image.open(tmp_path / "out" / "small.png").convert("RGB")
    assert drawn.size == (256, 256)  # 32 px scaled up 8x for legibility
    from kiln.draw import class_color

    # the circle box (0.9) was drawn after the overlapping square one (0.7): its colour is on top
    # where the two outlines cross; its left edge at x = 4 px original -> 32 px drawn
    assert drawn.getpixel((33, 120)) == class_color(0)
    colours = {drawn.getpixel((x, y)) for x in range(150, 256) for y in range(0, 60)}
    assert class_color(1) in colours  # legend swatch for "square" in the top-right corner
