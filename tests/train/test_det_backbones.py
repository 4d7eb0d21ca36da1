"""kiln-det detectors on torchvision ImageNet backbones: the same fixed-size raw outputs as kiln-det-s
(so export, INT8, verification and serving are unchanged), and --pretrained loads the backbone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from kiln.bundle import Architecture, Bundle, InputSpec, Manifest, Preprocess, TensorSpec
from kiln.models import MODELS, build_model, load_pretrained
from kiln.models.detector import TV_BACKBONES


def _arch(name: str, size: int = 128, classes: int = 3) -> Architecture:
    return Architecture(name=name, args={"num_classes": classes, "in_channels": 3, "image_size": size})


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large", "efficientnet_b0"])
def test_backbone_detectors_have_kiln_det_outputs(backbone: str) -> None:
    name = f"kiln-det-{backbone}"
    assert name in MODELS and MODELS[name].task == "detect"
    model = build_model(_arch(name)).eval()
    reference = build_model(_arch("kiln-det-s")).eval()
    with torch.no_grad():
        boxes, scores = model(torch.zeros(2, 3, 128, 128))
        ref_boxes, ref_scores = reference(torch.zeros(2, 3, 128, 128))
    assert boxes.shape == ref_boxes.shape and scores.shape == ref_scores.shape == (2, model.num_locations, 3)


def test_resnet50_backbone_builds() -> None:
    assert "resnet50" in TV_BACKBONES
    model = build_model(_arch("kiln-det-resnet50", 64)).eval()
    assert model.backbone.out_channels == [512, 1024, 2048]


def test_pretrained_applies_to_the_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / "hub" / "checkpoints" / os.path.basename(weights.url))
    model = build_model(_arch("kiln-det-resnet18"))
    pre, fresh = load_pretrained(model, _arch("kiln-det-resnet18"), True)
    assert torch.equal(model.backbone.net.conv1.weight, state["conv1.weight"]) and fresh == []
    assert pre.mean == pytest.approx(list(weights.transforms().mean))


def test_backbone_detector_exports_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from kiln.export.torch2onnx import torch2onnx

    name, size = "kiln-det-resnet18", 128
    torch.manual_seed(0)
    model = build_model(_arch(name, size)).eval()
    root = tmp_path / "det"
    root.mkdir()
    torch.save(model.state_dict(), root / "model.pt")
    bundle = Bundle(root, Manifest(
        kiln_version="0.1.0", task="detect", classes=["a", "b", "c"],
        input=InputSpec(name="images", shape=[3, size, size], batch={"min": 1, "opt": 2, "max": 4}),
        outputs=[TensorSpec(name="boxes", shape=[model.num_locations, 4]),
                 TensorSpec(name="scores", shape=[model.num_locations, 3])],
        preprocess=Preprocess(mode="letterbox", size=(size, size), mean=[0.485, 0.456, 0.406],
                              std=[0.229, 0.224, 0.225]),
        architecture=_arch(name, size)))
    bundle.save()
    torch2onnx(bundle, root / "model.onnx", batch=bundle.manifest.input.batch, simplify=False)
    x = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)
    sess = ort.InferenceSession(str(root / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(["boxes", "scores"], sess.run(None, {"images": x}), strict=True))
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    assert np.abs(got["boxes"] - want[0]).max() < 1e-3
    assert np.abs(got["scores"] - want[1]).max() < 1e-4
