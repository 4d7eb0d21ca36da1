"""DetectTask: what the training loop needs for object detection (see :class:`kiln.train.tasks.Task`).

Images are letterboxed with :func:`kiln.processing.to_unit` (exactly what serving does) and their boxes
moved with the same :class:`~kiln.processing.Letterbox`; training then augments image and boxes together
with torchvision.transforms.v2 (flip, scale/translate, colour jitter; tv_tensors.BoundingBoxes keep the
boxes in step). Validation computes the loss and COCO mAP (pycocotools) in original image pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kiln.bundle import DetectPost, Preprocess, TensorSpec
from kiln.data import ImageDataset
from kiln.errors import ConfigError
from kiln.metrics import coco_map, map_post
from kiln.models.detector import Detector
from kiln.processing import Letterbox, to_unit
from kiln.train.config import TrainConfig
from kiln.train.detect.loss import Grid, fcos_loss
from kiln.train.detect.post import detect_postprocess_torch
from kiln.train.stats import channel_stats, sample_indices


def _to_input(target: dict[str, np.ndarray], lb: Letterbox) -> np.ndarray:
    """Original-pixel boxes ``[K, 4]`` -> model-input pixels (the inverse of Letterbox.to_original)."""
    b = np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]] * lb.scale_x + lb.pad_x
    b[:, [1, 3]] = b[:, [1, 3]] * lb.scale_y + lb.pad_y
    return b


def _to_uint8(unit: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(unit * 255.0 + 0.5, 0, 255).astype(np.uint8))


class DetectDataset(Dataset):
    """Raw detection images -> ``(x [C, H, W] normalized, target)``.

    ``target``: ``boxes [K, 4]`` float32 xyxy input pixels, ``labels [K]`` int64, ``index``; validation
    items also carry the ``letterbox`` and the original-pixel ``orig`` target for mAP. In-memory
    datasets are letterboxed once up front (uint8), file datasets lazily in the loader workers.
    """

    def __init__(self, raw: ImageDataset, pre: Preprocess, augment: nn.Module | None) -> None:
        self.raw, self.pre, self.augment = raw, pre, augment
        self.mean = torch.tensor(pre.mean).view(-1, 1, 1)
        self.std = torch.tensor(pre.std).view(-1, 1, 1)
        self.cached: list[tuple[torch.Tensor, Letterbox]] | None = None
        if isinstance(raw.images, np.ndarray):
            self.cached = [self._place(i) for i in range(len(raw))]

    def _place(self, i: int) -> tuple[torch.Tensor, Letterbox]:
        unit, lb = to_unit(self.raw.image(i, self.pre), self.pre)
        return _to_uint8(unit), lb

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img, lb = self.cached[i] if self.cached is not None else self._place(i)
        orig = self.raw.target(i)
        boxes = torch.from_numpy(_to_input(orig, lb))
        labels = torch.as_tensor(np.asarray(orig["labels"]), dtype=torch.int64).reshape(-1)
        target: dict[str, Any] = {"index": i}
        if self.augment is not None:
            from torchvision import tv_tensors

            sample = self.augment({
                "image": tv_tensors.Image(img),
                "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(img.shape[-2:])),
                "labels": labels,
            })
            img, boxes = sample["image"].as_subclass(torch.Tensor), sample["boxes"].as_subclass(torch.Tensor)
            labels = sample["labels"]
        else:
            target.update(letterbox=lb, orig=orig)
        target.update(boxes=boxes.float().reshape(-1, 4), labels=labels)
        x = (img.float() / 255.0 - self.mean) / self.std
        return x, target


def augmentation(pre: Preprocess) -> nn.Module:
    """Box-aware training augmentation on the letterboxed uint8 image."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    fill = {tv_tensors.Image: pre.pad_value, "others": 0}
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomAffine(degrees=0.0, translate=(0.1, 0.1), scale=(0.8, 1.2), fill=fill)],
                       p=0.5),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),  # no hue: 4x the cost on CPU
        v2.SanitizeBoundingBoxes(min_size=1.0),  # boxes pushed out of the frame by the affine
    ])


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside DDP / torch.compile wrappers (for its location grid)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def detector(model: nn.Module) -> Detector:
    m = unwrap(model)
    if not isinstance(m, Detector):
        raise ConfigError(
            f"the detect task needs a kiln detector (kiln-det-s, kiln-det-m), got {type(m).__name__}")
    return m


def grid_of(model: nn.Module) -> Grid:
    m = detector(model)
    return Grid(m.points, m.strides, m.range_lo, m.range_hi)


class DetectTask:
    name = "detect"
    primary = "map"
    default_model = "kiln-det-s"
    # What reaches the shapes target on 2 CPU cores (docs/train-detection.md); not yet read by the loop,
    # which takes TrainConfig.batch_size (64) and the model's default_size.
    default_batch_size = 16
    default_image_size = 128

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classes: list[str] = [str(i) for i in range(num_classes)]

    def preprocess_spec(self, cfg: TrainConfig, train: ImageDataset, size: int) -> Preprocess:
        base = Preprocess(mode="letterbox", size=(size, size), channels=train.channels, mean=[0.0], std=[1.0],
                          pad_value=114)
        idx = sample_indices(len(train), 500, cfg.seed)
        mean, std = channel_stats([to_unit(train.image(i), base)[0] for i in idx])
        return base.model_copy(update={"mean": mean, "std": std})

    def torch_datasets(self, cfg: TrainConfig, train: ImageDataset, val: ImageDataset,
                       pre: Preprocess) -> tuple[Dataset, Dataset]:
        self.classes = list(train.classes)
        return DetectDataset(train, pre, augmentation(pre)), DetectDataset(val, pre, None)

    def collate(self, items: list[Any]) -> Any:
        xs, targets = zip(*items, strict=True)
        return torch.stack(xs), list(targets)

    def outputs(self, model: nn.Module, num_classes: int) -> list[TensorSpec]:
        a = detector(model).num_locations
        return [TensorSpec(name="boxes", shape=[a, 4], dtype="float32"),
                TensorSpec(name="scores", shape=[a, num_classes], dtype="float32")]

    def postprocess(self) -> dict[str, Any]:
        return DetectPost().model_dump()

    def model_args(self, cfg: TrainConfig) -> dict[str, Any]:
        return {}

    def step(self, model: nn.Module, batch: Any,
             device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        x, targets = batch
        raw = model(x.to(device, non_blocking=True))
        loss, parts = fcos_loss(raw, grid_of(model), targets, self.num_classes)
        n = float(len(targets))
        stats = {"count": n, "loss_sum": loss.item() * n}
        stats.update({f"{k}_sum": v * n for k, v in parts.items() if k != "positives"})
        return loss, stats

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        model.eval()
        det = detector(model)
        post = map_post(DetectPost())
        detections: list[list[dict[str, object]]] = []
        originals: list[dict[str, np.ndarray]] = []
        loss_sum, count = 0.0, 0
        for x, targets in loader:
            raw = det.raw(x.to(device))
            loss, _ = fcos_loss(raw, grid_of(det), targets, self.num_classes)
            loss_sum += loss.item() * len(targets)
            count += len(targets)
            boxes, scores = det.decode(raw)
            detections += detect_postprocess_torch(boxes, scores, [t["letterbox"] for t in targets], post,
                                                   self.classes)
            originals += [t["orig"] for t in targets]
        m = coco_map(detections, originals, self.classes)
        return {"loss": loss_sum / max(count, 1), "map": m["map"], "map50": m["map50"], "map75": m["map75"]}
