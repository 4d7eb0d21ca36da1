"""Detector training end to end on a tiny COCO folder: a valid bundle, exact resume, kiln eval reports,
negative-only batches, and an ONNX export (dynamo, dynamic batch) that matches PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kiln.bundle import Bundle
from kiln.data.detect import write_shapes_coco
from kiln.models import load_model
from kiln.models.detector import build_detector
from kiln.train import checkpoint
from kiln.train.config import TrainConfig
from kiln.train.detect.task import DetectTask
from kiln.train.loop import Trainer, TrainingInterrupted, train


@pytest.fixture(scope="module")
def coco_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = write_shapes_coco(tmp_path_factory.mktemp("coco") / "shapes", count=30, seed=1)
    return f"coco:{root}/annotations/instances_train.json:{root}/images/train"


def _cfg(data: str, out: Path, epochs: int) -> TrainConfig:
    return TrainConfig(data=data, epochs=epochs, batch_size=8, image_size=64, out=str(out), workers=0)


def test_train_resume_and_eval(coco_spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, trainer = train(_cfg(coco_spec, tmp_path / "a", 2), progress=False)
    assert trainer.task.name == "detect" and trainer.cfg.model == "kiln-det-s"
    bundle = Bundle.load(tmp_path / "a")
    m = bundle.manifest
    assert m.task == "detect" and m.classes == ["circle", "square", "triangle"]
    assert m.preprocess.mode == "letterbox" and m.preprocess.size == (64, 64)
    a = 8 * 8 + 4 * 4 + 2 * 2
    assert [(o.name, o.shape) for o in m.outputs] == [("boxes", [a, 4]), ("scores", [a, 3])]
    assert m.detect_post().iou_threshold == 0.5
    assert {"map", "map50", "loss"} <= set(result.best) and 0.0 <= result.best["map"] <= 1.0
    model = load_model(bundle)
    boxes, scores = model(torch.zeros(2, 3, 64, 64))
    assert boxes.shape == (2, a, 4) and scores.shape == (2, a, 3)

    # exact resume: a run stopped after epoch 1 (Ctrl-C) and resumed ends with the same weights
    original = Trainer._end_epoch

    def stop_after_first(self: Trainer, epoch: int, *args: Any) -> Any:
        row = original(self, epoch, *args)
        if epoch == 0:
            raise KeyboardInterrupt
        return row

    monkeypatch.setattr(Trainer, "_end_epoch", stop_after_first)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(coco_spec, tmp_path / "b", 2), progress=False)
    monkeypatch.setattr(Trainer, "_end_epoch", original)
    train(_cfg(coco_spec, tmp_path / "b", 2), resume=tmp_path / "b", progress=False)
    sa, sb = (
        checkpoint.load(tmp_path / "a" / "last.pt")["model"],
        checkpoint.load(tmp_path / "b" / "last.pt")["model"],
    )
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    from kiln.cli import main

    assert main(["eval", str(tmp_path / "a"), "--no-table"]) == 0
    evaluated = Bundle.load(tmp_path / "a").manifest.evaluation["fp32"]
    # numpy serving path == training eval
    assert evaluated["map"] == pytest.approx(result.best["map"], abs=1e-6)
    preds = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert isinstance(preds, list) and all(
        {"image_id", "category_id", "bbox", "score"} <= set(p) for p in preds
    )
    assert (tmp_path / "a" / "predictions.png").stat().st_size > 1000
    assert (tmp_path / "a" / "per_class_ap.csv").read_text().startswith("class,ap_50_95")


def test_negative_only_batch_has_a_finite_loss() -> None:
    model = build_detector("s", num_classes=2, in_channels=3, image_size=64).train()
    task = DetectTask(2)
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long)}
    loss, stats = task.step(model, (torch.randn(2, 3, 64, 64), [empty, empty]), torch.device("cpu"))
    loss.backward()
    assert torch.isfinite(loss) and stats["count"] == 2
    assert model.head.cls_logits.weight.grad is not None


def test_onnx_export_dynamic_batch(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    model = build_detector("s", num_classes=3, in_channels=3, image_size=64).eval()
    path = tmp_path / "det.onnx"
    batch = torch.export.Dim("batch", min=1, max=16)
    torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), str(path), input_names=["images"],
                      output_names=["boxes", "scores"],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False)
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"NonMaxSuppression", "Loop", "If", "NonZero", "TopK"}  # fixed-size raw outputs only
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            ref = [t.numpy() for t in model(x)]
        got = sess.run(None, {"images": x.numpy()})
        assert [g.shape for g in got] == [(n, 84, 4), (n, 84, 3)]
        for r, g in zip(ref, got, strict=True):
            assert np.allclose(r, g, atol=1e-4)


@pytest.mark.parametrize(("size", "image_size"), [("s", 96), ("m", 64)])
def test_detector_sizes_match_their_grid(size: str, image_size: int) -> None:
    model = build_detector(size, num_classes=4, in_channels=1, image_size=image_size).eval()
    with torch.no_grad():
        boxes, scores = model(torch.randn(2, 1, image_size, image_size))
    a = sum((image_size // s) ** 2 for s in (8, 16, 32))
    assert model.num_locations == a and boxes.shape == (2, a, 4) and scores.shape == (2, a, 4)
    assert (
        float(boxes.min()) >= 0
        and float(boxes.max()) <= image_size
        and 0 <= float(scores.min()) <= float(scores.max()) <= 1
    )


def test_detector_ddp_two_cpu_processes(coco_spec: str, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes trains a detector into a valid bundle written by rank 0 only."""
    import os
    import subprocess
    import sys

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "kiln.cli", "train", "--data", coco_spec, "--epochs", "1", "--batch-size", "4",
           "--image-size", "64",
           "--out", str(run), "--no-progress", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)  # exactly one JSON document: only rank 0 prints
    m = Bundle.load(run).manifest
    assert m.task == "detect" and m.training["world_size"] == 2
    assert {"map", "map50"} <= set(summary["metrics"])
    torch.load(run / "model.pt", weights_only=True)
