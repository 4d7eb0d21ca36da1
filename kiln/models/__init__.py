"""The model registry: name -> a builder of an ``nn.Module`` from (classes, channels, input size, args).

Architectures are torchvision's (no downloaded weights), adapted to the input channels and the class
count; small inputs (<= 64 px) get a stride-1 stem so a 32x32 image is not reduced to 1x1.
``kiln.json`` records the name and arguments, so ``load_model(bundle)`` rebuilds the same module.

Training builds from this registry and the PyTorch backend and export rebuild from it, so it lives in
core. It imports torch: modules that must run without torch (bundle, processing, kiln.runtime, serve)
import it only where a torch model is actually built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from kiln.bundle import Architecture, Bundle
from kiln.errors import CheckpointError, ConfigError, unknown_choice
from kiln.models.detector import build_detector


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling; 28x28 inputs give the classic 16x5x5 map."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((5, 5)),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int, **_: Any) -> nn.Module:
        model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
        if image_size <= 64:
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return model

    return build


def _mobilenet_v3_small(num_classes: int, in_channels: int, image_size: int, **_: Any) -> nn.Module:
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    stride = 1 if image_size <= 64 else 2
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
    return model


def _lenet5(num_classes: int, in_channels: int, **_: Any) -> nn.Module:
    return LeNet5(num_classes, in_channels)


def _detector(size: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int, **kw: Any) -> nn.Module:
        return build_detector(size, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)

    return build


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]
    task: str
    default_size: int | None  # input side when the dataset does not fix one


MODELS: dict[str, ModelEntry] = {
    "lenet5": ModelEntry(_lenet5, "classify", 28),
    "resnet18": ModelEntry(_resnet(18), "classify", None),
    "resnet34": ModelEntry(_resnet(34), "classify", None),
    "resnet50": ModelEntry(_resnet(50), "classify", None),
    "mobilenet_v3_small": ModelEntry(_mobilenet_v3_small, "classify", None),
    "kiln-det-s": ModelEntry(_detector("s"), "detect", 128),
    "kiln-det-m": ModelEntry(_detector("m"), "detect", 320),
}


def model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise unknown_choice("model", name, MODELS, flag="--model")
    return MODELS[name]


def build_model(arch: Architecture) -> nn.Module:
    """Build the (untrained) module that ``arch`` describes."""
    return model_entry(arch.name).build(**arch.args)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``; accepts a bare state dict or a kiln checkpoint."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"weights file not found: {path}") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read weights {path}: not a valid PyTorch file ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, replace_head: bool = False) -> list[str]:
    """Copy ``state`` into ``model``. With ``replace_head``, tensors whose shape differs are skipped
    (the new head keeps its fresh initialization); returns the names that were skipped."""
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if skipped and not replace_head:
        k = skipped[0]
        raise CheckpointError(f"weights do not fit the model: {k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}")
    filtered = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    missing = [m for m in missing if m not in skipped]
    if unexpected or (missing and not replace_head):
        raise CheckpointError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return skipped


def load_model(bundle: Bundle | str | os.PathLike[str], *, file: str = "model.pt") -> nn.Module:
    """Rebuild the bundle's architecture, load ``model.pt`` and return it in eval mode on the CPU."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    path = b.path(file)
    if not path.is_file():
        raise ConfigError(f"{b.root} has no {file}: train first (kiln train --out {b.root})")
    model = build_model(b.manifest.architecture)
    load_weights(model, read_state_dict(path))
    return model.eval()
