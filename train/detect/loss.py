"""FCOS training targets and loss: sigmoid focal loss (classes), GIoU loss (boxes), BCE (centerness).

The losses are torchvision's (:func:`torchvision.ops.sigmoid_focal_loss`,
:func:`torchvision.ops.generalized_box_iou_loss`); this module only assigns ground-truth boxes to
locations. A location is positive for a box when it lies in the box's centre region (``radius *
stride`` around the centre, clipped to the box), the largest of its four side distances falls in the
level's regression range, and among such boxes it has the smallest area.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss


@dataclass
class Grid:
    points: torch.Tensor  # [A, 2]
    strides: torch.Tensor  # [A]
    range_lo: torch.Tensor  # [A]
    range_hi: torch.Tensor  # [A]


@dataclass
class Assignment:
    cls_target: torch.Tensor  # [N, A, C] one-hot (all zero: background)
    box_target: torch.Tensor  # [N, A, 4] xyxy input pixels (valid where positive)
    positive: torch.Tensor  # [N, A] bool


def pad_targets(targets: list[dict[str, torch.Tensor]],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-image boxes ``[K_i, 4]``/labels into ``[N, K, 4]``, ``[N, K]`` and a validity mask."""
    k = max([len(t["labels"]) for t in targets] + [1])
    n = len(targets)
    boxes = torch.zeros((n, k, 4), device=device)
    labels = torch.zeros((n, k), dtype=torch.long, device=device)
    valid = torch.zeros((n, k), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        m = len(t["labels"])
        if m:
            boxes[i, :m] = t["boxes"].to(device)
            labels[i, :m] = t["labels"].to(device)
            valid[i, :m] = True
    return boxes, labels, valid


@torch.no_grad()
def assign(grid: Grid, targets: list[dict[str, torch.Tensor]], num_classes: int,
           radius: float = 1.5) -> Assignment:
    device = grid.points.device
    boxes, labels, valid = pad_targets(targets, device)  # [N, K, 4], [N, K], [N, K]
    px = grid.points[None, :, None, 0]  # [1, A, 1]
    py = grid.points[None, :, None, 1]
    x1, y1, x2, y2 = (boxes[:, None, :, j] for j in range(4))  # [N, 1, K]
    ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], -1)  # [N, A, K, 4]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    r = grid.strides[None, :, None] * radius
    in_centre = ((px - torch.maximum(cx - r, x1)) > 0) & ((torch.minimum(cx + r, x2) - px) > 0) \
        & ((py - torch.maximum(cy - r, y1)) > 0) & ((torch.minimum(cy + r, y2) - py) > 0)
    reach = ltrb.max(-1).values
    in_range = (reach >= grid.range_lo[None, :, None]) & (reach <= grid.range_hi[None, :, None])
    ok = in_centre & in_range & valid[:, None, :]
    area = ((x2 - x1) * (y2 - y1)).expand_as(reach)
    area = torch.where(ok, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(-1)  # [N, A]
    positive = torch.isfinite(best_area)
    box_target = torch.gather(boxes, 1, best[..., None].expand(-1, -1, 4))
    label = torch.gather(labels, 1, best)
    cls_target = torch.zeros((*best.shape, num_classes), device=device)
    cls_target[positive] = nn.functional.one_hot(label[positive], num_classes).float()
    return Assignment(cls_target, box_target, positive)


def centerness_target(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of points ``[P, 2]`` inside boxes ``[P, 4]``: 1 at the centre, 0 at an edge."""
    left, top = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    right, bottom = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    lr = torch.stack([left, right], -1).clamp(min=1e-6)
    tb = torch.stack([top, bottom], -1).clamp(min=1e-6)
    return torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))


def fcos_loss(raw: dict[str, torch.Tensor], grid: Grid, targets: list[dict[str, torch.Tensor]],
              num_classes: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss (mean per positive location) and its parts for logging."""
    cls_logits = raw["cls_logits"].float()
    ltrb = raw["ltrb"].float()
    ctr_logits = raw["centerness"].float()
    a = assign(grid, targets, num_classes)
    num_pos = max(1.0, float(a.positive.sum()))
    loss_cls = sigmoid_focal_loss(cls_logits, a.cls_target, reduction="sum") / num_pos
    pos = a.positive
    if pos.any():
        pts = grid.points[None].expand(pos.shape[0], -1, -1)[pos]  # [P, 2]
        d = ltrb[pos]
        pred = torch.cat([pts - d[:, :2], pts + d[:, 2:]], -1)
        gt = a.box_target[pos]
        ctr_t = centerness_target(pts, gt)
        loss_box = (
            generalized_box_iou_loss(pred, gt, reduction="none") * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
        loss_ctr = nn.functional.binary_cross_entropy_with_logits(ctr_logits[pos], ctr_t,
                                                                  reduction="sum") / num_pos
    else:  # only negative images in the batch: keep the graph connected for DDP
        loss_box = ltrb.sum() * 0.0
        loss_ctr = ctr_logits.sum() * 0.0
    total = loss_cls + loss_box + loss_ctr
    return total, {"loss_cls": loss_cls.item(), "loss_box": loss_box.item(), "loss_ctr": loss_ctr.item(),
                   "positives": float(pos.sum())}
