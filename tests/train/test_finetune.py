"""Fine-tuning: pretrained weights from a pre-filled TORCH_HOME through `kiln train`, the weights'
preprocessing in kiln.json, a frozen backbone for the first epochs and a lower backbone learning rate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from kiln.bundle import Architecture, Bundle
from kiln.models import build_model, load_model
from kiln.train.config import TrainConfig
from kiln.train.finetune import head_parameters, param_groups, set_epoch


def _arch(name: str, size: int = 64) -> Architecture:
    return Architecture(name=name, args={"num_classes": 3, "in_channels": 3, "image_size": size})


@pytest.mark.parametrize("name,head", [("resnet18", {"fc.weight", "fc.bias"}),
                                       ("mobilenet_v3_small", {"classifier.3.weight", "classifier.3.bias"}),
                                       ("convnext_tiny", {"classifier.2.weight", "classifier.2.bias"})])
def test_head_and_param_groups(name: str, head: set[str]) -> None:
    model = build_model(_arch(name, 224 if name == "convnext_tiny" else 64))
    assert head_parameters(model) == head
    groups = param_groups(model, TrainConfig(backbone_lr_scale=0.1), 1e-3)
    assert [g["lr"] for g in groups] == [pytest.approx(1e-4), 1e-3] and len(groups[1]["params"]) == 2
    assert len(param_groups(model, TrainConfig(), 1e-3)) == 1


def test_detector_backbone_is_frozen_then_unfrozen() -> None:
    model = build_model(_arch("kiln-det-resnet18", 64))
    cfg = TrainConfig(freeze_backbone=2)
    set_epoch(model, cfg, 0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("backbone.") for n in frozen)
    assert model.fpn.inner_blocks[0][0].weight.requires_grad
    set_epoch(model, cfg, 2)
    assert all(p.requires_grad for p in model.parameters())


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, size=(40, 50, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )
    return root


def test_train_pretrained_frozen_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.train.loop import train

    torch.set_num_threads(1)
    weights = torchvision.models.get_model_weights("mobilenet_v3_small").IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(5)
    state = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(state, tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url))
    out = tmp_path / "run"
    train(TrainConfig(data=f"folder:{_folder(tmp_path / 'data')}", model="mobilenet_v3_small",
                      pretrained="IMAGENET1K_V1",
                      freeze_backbone=1, backbone_lr_scale=0.1, epochs=1, batch_size=4, out=str(out),
                      val_fraction=0.34),
          progress=False)
    manifest = json.loads((out / "kiln.json").read_text())
    t = weights.transforms()
    pre = manifest["preprocess"]
    assert (pre["mode"], pre["size"], pre["resize_size"], pre["channels"]) == (
        "center_crop",
        [224, 224],
        t.resize_size[0],
        "RGB",
    )
    assert pre["mean"] == pytest.approx(t.mean) and pre["std"] == pytest.approx(t.std)
    model = load_model(Bundle.load(out))
    # one epoch with the backbone frozen: its first layer is still the file's, the new head has 2 classes
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])
    assert model.classifier[3].weight.shape == (2, 1024)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_every_schedule_keeps_the_backbone_share(schedule: str) -> None:
    from kiln.train.optim import build_optimizer, build_scheduler

    cfg = TrainConfig(schedule=schedule, epochs=2, backbone_lr_scale=0.1, lr=1e-2)
    model = build_model(_arch("resnet18"))
    opt = build_optimizer(cfg, param_groups(model, cfg, cfg.learning_rate))
    sched = build_scheduler(cfg, opt, steps_per_epoch=5)
    for _ in range(4):
        opt.step()
        sched.step()
        backbone, head = (g["lr"] for g in opt.param_groups)
        assert backbone == pytest.approx(head * 0.1)
