"""kiln-det-s / kiln-det-m: a one-stage, anchor-free (FCOS-style) detector that exports cleanly.

Backbone (torchvision ResNet ``BasicBlock`` stages; ``s`` is a narrow 4-stage trunk sized for CPU
training, ``m`` the resnet18 trunk) -> torchvision ``FeaturePyramidNetwork`` over strides 8, 16, 32 ->
one head shared by the levels: a classification tower (per-class logits) and a regression tower
(distances to the four box sides, and centerness), as in FCOS (Tian et al. 2019).

In eval mode ``forward`` returns fixed-size raw outputs for every location, with no NMS, loops over
data or data-dependent shapes, so ONNX (dynamic batch) and TensorRT take the graph as it is:

- ``boxes``  ``[N, A, 4]`` xyxy in model-input pixels, decoded from the distances;
- ``scores`` ``[N, A, C]`` ``sqrt(sigmoid(class logit) * sigmoid(centerness))``.

``A`` = sum over levels of ``ceil(S / stride)^2`` for an ``S x S`` input. Score filtering, NMS and the
mapping back to original pixels happen after the model (:func:`kiln.processing.detect_postprocess`).
In train mode ``forward`` returns the raw head outputs the loss needs (:meth:`Detector.raw`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FeaturePyramidNetwork

from kiln.errors import ConfigError
from kiln.models.backbones import TorchvisionBackbone

STRIDES = (8, 16, 32)
# torchvision classifiers offered as backbones (kiln-det-<name>); any resnet or features-style network works
TV_BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large", "efficientnet_b0")


@dataclass(frozen=True)
class DetectorConfig:
    widths: tuple[int, int, int, int]  # channels of the stride 4, 8, 16, 32 stages
    blocks: tuple[int, int, int, int]
    fpn: int  # FPN and head channels
    tower: int  # conv layers in each head tower
    # resnet-style 7x7 stem + max-pool (m) or a cheap 3x3 stride-2 conv + stride-2 stage (s)
    stem_maxpool: bool


CONFIGS = {
    "s": DetectorConfig(widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1), fpn=48, tower=2, stem_maxpool=False),
    "m": DetectorConfig(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), fpn=128, tower=3, stem_maxpool=True),
}


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    layers = [BasicBlock(cin, cout, stride, down)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """ResNet stages; returns the stride 8, 16 and 32 feature maps."""

    def __init__(self, cfg: DetectorConfig, in_channels: int) -> None:
        super().__init__()
        w, b = cfg.widths, cfg.blocks
        if cfg.stem_maxpool:  # exactly torchvision's resnet stem
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            self.layer1 = _stage(w[0], w[0], b[0], 1)
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, w[0], 3, 2, 1, bias=False), nn.BatchNorm2d(w[0]),
                                      nn.ReLU(inplace=True))
            self.layer1 = _stage(w[0], w[0], b[0], 2)
        self.layer2 = _stage(w[0], w[1], b[1], 2)
        self.layer3 = _stage(w[1], w[2], b[2], 2)
        self.layer4 = _stage(w[2], w[3], b[3], 2)
        self.out_channels = [w[1], w[2], w[3]]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return OrderedDict([("p3", c3), ("p4", c4), ("p5", c5)])


class Scale(nn.Module):
    """A learnable scalar per level: one head serves objects of different sizes (FCOS)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _tower(channels: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                   nn.GroupNorm(min(16, channels // 4), channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Head(nn.Module):
    def __init__(self, channels: int, num_classes: int, depth: int, prior: float = 0.01) -> None:
        super().__init__()
        self.cls_tower = _tower(channels, depth)
        self.reg_tower = _tower(channels, depth)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, 1, 1)
        self.bbox_reg = nn.Conv2d(channels, 4, 3, 1, 1)
        self.centerness = nn.Conv2d(channels, 1, 3, 1, 1)
        self.scales = nn.ModuleList(Scale() for _ in STRIDES)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # focal-loss prior: start by predicting "background" everywhere, or the loss explodes early
        bias = self.cls_logits.bias
        if bias is not None:
            nn.init.constant_(bias, -math.log((1 - prior) / prior))

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-level head outputs flattened to ``cls [N, A, C]``, ``ltrb [N, A, 4]`` (pixels),
        ``ctr [N, A]``."""
        cls_out, reg_out, ctr_out = [], [], []
        for feat, stride, scale in zip(feats, STRIDES, self.scales, strict=True):
            c = self.cls_tower(feat)
            r = self.reg_tower(feat)
            n = feat.shape[0]
            cls_out.append(self.cls_logits(c).flatten(2).transpose(1, 2))
            # softplus keeps distances positive without relu's dead zone; * stride: per-level units
            dist = nn.functional.softplus(scale(self.bbox_reg(r))) * stride
            reg_out.append(dist.flatten(2).transpose(1, 2))
            ctr_out.append(self.centerness(r).reshape(n, -1))
        return torch.cat(cls_out, 1), torch.cat(reg_out, 1), torch.cat(ctr_out, 1)


def feature_sizes(image_size: int) -> list[int]:
    """Side of each level's map for an ``image_size`` input (every stride-2 layer rounds up)."""
    out, s = [], image_size
    for _ in range(2):
        s = (s + 1) // 2
    for _ in STRIDES:
        s = (s + 1) // 2
        out.append(s)
    return out


class Detector(nn.Module):
    """See the module docstring. ``image_size`` fixes the (square) input the location grid is built for."""

    points: torch.Tensor
    strides: torch.Tensor
    range_lo: torch.Tensor
    range_hi: torch.Tensor

    def __init__(self, cfg: DetectorConfig, num_classes: int, in_channels: int, image_size: int,
                 backbone: nn.Module | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"a detector needs at least one class, got {num_classes}")
        if image_size < 32 or image_size % 32:
            raise ConfigError(
                f"--image-size {image_size}: a detector's input side must be a "
                "multiple of 32 (e.g. 128, 160, 256)")
        self.num_classes, self.image_size = num_classes, image_size
        self.backbone = backbone if backbone is not None else Backbone(cfg, in_channels)
        self.fpn = FeaturePyramidNetwork(self.backbone.out_channels, cfg.fpn)
        self.head = Head(cfg.fpn, num_classes, cfg.tower)
        points, strides, lo, hi = [], [], [], []
        bounds = [0.0, 4.0 * STRIDES[0], 4.0 * STRIDES[1], math.inf]  # max side distance each level regresses
        for level, (stride, side) in enumerate(zip(STRIDES, feature_sizes(image_size), strict=True)):
            ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            pts = (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * stride
            points.append(pts)
            strides.append(torch.full((len(pts),), float(stride)))
            lo.append(torch.full((len(pts),), bounds[level]))
            hi.append(torch.full((len(pts),), bounds[level + 1]))
        # constants of the grid, not weights: rebuilt from image_size, so not in the state dict
        self.register_buffer("points", torch.cat(points), persistent=False)  # [A, 2] (x, y) input pixels
        self.register_buffer("strides", torch.cat(strides), persistent=False)  # [A]
        self.register_buffer("range_lo", torch.cat(lo), persistent=False)  # [A]
        self.register_buffer("range_hi", torch.cat(hi), persistent=False)  # [A]

    @property
    def num_locations(self) -> int:
        return int(self.points.shape[0])

    def raw(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs for the loss: ``cls_logits [N, A, C]``, ``ltrb [N, A, 4]``, ``centerness [N, A]``."""
        feats = self.fpn(self.backbone(x))
        cls, ltrb, ctr = self.head(list(feats.values()))
        return {"cls_logits": cls, "ltrb": ltrb, "centerness": ctr}

    def decode(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``boxes [N, A, 4]`` xyxy input pixels and ``scores [N, A, C]`` from :meth:`raw`'s outputs."""
        ltrb = raw["ltrb"].float()
        p = self.points
        boxes = (torch.cat([p - ltrb[..., :2], p + ltrb[..., 2:]], -1)
                 .clamp_min(0.0).clamp_max(float(self.image_size)))
        scores = torch.sqrt(
            torch.sigmoid(raw["cls_logits"].float()) * torch.sigmoid(raw["centerness"].float()).unsqueeze(-1))
        return boxes, scores

    def forward(self, x: torch.Tensor) -> Any:
        raw = self.raw(x)
        if self.training:
            return raw
        return self.decode(raw)


def build_detector(size: str, *, num_classes: int, in_channels: int = 3, image_size: int = 128,
                   **_: Any) -> Detector:
    """``s`` / ``m``: kiln's own trunks; a name in :data:`TV_BACKBONES`: that torchvision ImageNet
    classifier as the backbone (its weights load with ``--pretrained``), with ``m``'s FPN and head."""
    if size in TV_BACKBONES:
        return Detector(CONFIGS["m"], num_classes, in_channels, image_size,
                        TorchvisionBackbone(size, in_channels))
    if size not in CONFIGS:
        raise ConfigError(f"unknown detector size '{size}' (known: {', '.join([*CONFIGS, *TV_BACKBONES])})")
    return Detector(CONFIGS[size], num_classes, in_channels, image_size)
