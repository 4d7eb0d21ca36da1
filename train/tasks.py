"""What differs between classification and detection during training, behind one small protocol.

The training loop (:mod:`kiln.train.loop`) knows nothing task-specific: it asks the task for the torch
datasets, the input spec, the loss of a batch and the validation metrics. ``primary`` names the
validation metric (higher is better) that picks best.pt.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kiln.bundle import Preprocess, TensorSpec
from kiln.data import ImageDataset
from kiln.metrics import classification_metrics
from kiln.processing import to_unit
from kiln.train.config import TrainConfig
from kiln.train.detect.task import DetectTask
from kiln.train.stats import channel_stats, sample_indices


class Task(Protocol):
    name: str  # "classify" | "detect"
    primary: str  # validation metric that selects best.pt (higher is better)
    default_model: str
    default_batch_size: int

    def preprocess_spec(self, cfg: TrainConfig, train: ImageDataset, size: int) -> Preprocess: ...

    def torch_datasets(self, cfg: TrainConfig, train: ImageDataset, val: ImageDataset,
                       pre: Preprocess) -> tuple[Dataset, Dataset]: ...

    def collate(self, items: list[Any]) -> Any: ...

    def outputs(self, model: nn.Module, num_classes: int) -> list[TensorSpec]: ...

    def postprocess(self) -> dict[str, Any]: ...

    def model_args(self, cfg: TrainConfig) -> dict[str, Any]: ...

    def step(self, model: nn.Module, batch: Any,
             device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one training batch and counters summed over the batch (``count`` = images)."""
        ...

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Validation metrics (including ``loss`` and ``self.primary``) of ``model`` over ``loader``."""
        ...


class ClassifyDataset(Dataset):
    """Raw images -> normalized ``[C, H, W]`` tensors via kiln.processing (+ augmentation when training).

    In-memory datasets (arrays, or files held by the decode cache) are converted once up front; file
    datasets are read lazily (in worker processes).
    """

    def __init__(self, raw: ImageDataset, pre: Preprocess, augment: nn.Module | None) -> None:
        self.raw, self.pre, self.augment = raw, pre, augment
        # uint8 [N, C, H, W] at the input size: exact, 4x smaller than float
        self.cached: torch.Tensor | None = None
        if (isinstance(raw.images, np.ndarray) or raw.decoded is not None) and len(raw):
            self.cached = torch.from_numpy(
                np.stack([_to_uint8(to_unit(raw.image(i, pre), pre)[0]) for i in range(len(raw))]))
        self.mean = torch.tensor(pre.mean).view(-1, 1, 1)
        self.std = torch.tensor(pre.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.cached is not None:
            x = self.cached[i].float() / 255.0
        else:
            x = torch.from_numpy(to_unit(self.raw.image(i, self.pre), self.pre)[0])
        if self.augment is not None:
            x = self.augment(x)
        return (x - self.mean) / self.std, int(self.raw.target(i))


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(unit * 255.0).astype(np.uint8)  # to_unit divided 8-bit pixels by 255: this is exact


class ClassifyTask:
    name = "classify"
    primary = "top1"
    default_model = "lenet5"
    default_batch_size = 64

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.label_smoothing = 0.0

    def preprocess_spec(self, cfg: TrainConfig, train: ImageDataset, size: int) -> Preprocess:
        base = Preprocess(mode="resize", size=(size, size), channels=train.channels, mean=[0.0], std=[1.0])
        idx = sample_indices(len(train), 2000, cfg.seed)
        # decoded as training decodes
        mean, std = channel_stats([to_unit(train.image(i, base), base)[0] for i in idx])
        return base.model_copy(update={"mean": mean, "std": std})

    def torch_datasets(self, cfg: TrainConfig, train: ImageDataset, val: ImageDataset,
                       pre: Preprocess) -> tuple[Dataset, Dataset]:
        self.label_smoothing = cfg.label_smoothing
        return ClassifyDataset(train, pre, self._augmentation(pre)), ClassifyDataset(val, pre, None)

    @staticmethod
    def _augmentation(pre: Preprocess) -> nn.Module:
        from torchvision.transforms import v2

        size = pre.size[0]
        if pre.channels == "L":  # digits / characters: no flips, small geometric jitter
            return v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
        return v2.Compose([
            v2.RandomCrop(pre.size, padding=max(2, size // 8), padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.2, 0.2, 0.2),
        ])

    def collate(self, items: list[Any]) -> Any:
        xs, ys = zip(*items, strict=True)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    def outputs(self, model: nn.Module, num_classes: int) -> list[TensorSpec]:
        return [TensorSpec(name="logits", shape=[num_classes], dtype="float32")]

    def postprocess(self) -> dict[str, Any]:
        return {"top_k": min(5, self.num_classes)}

    def model_args(self, cfg: TrainConfig) -> dict[str, Any]:
        return {}

    def step(self, model: nn.Module, batch: Any,
             device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        correct = (logits.argmax(1) == y).sum().item()
        return loss, {"correct": float(correct), "count": float(len(y)), "loss_sum": loss.item() * len(y)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        model.eval()
        logits, labels = [], []
        for x, y in loader:
            logits.append(model(x.to(device)).float().cpu())
            labels.append(y)
        out = torch.cat(logits)
        y = torch.cat(labels)
        loss = nn.functional.cross_entropy(out, y).item()
        metrics = classification_metrics(out.numpy(), y.numpy(), self.num_classes)
        result = {"loss": loss, "top1": metrics["top1"]}
        if self.num_classes > 5:  # with 5 classes or fewer top-5 is 100% by definition
            result["top5"] = metrics["top5"]
        return result


def make_task(name: str, num_classes: int) -> Task:
    if name == "classify":
        return ClassifyTask(num_classes)
    return DetectTask(num_classes)


def default_workers(raw: ImageDataset) -> int:
    """0 when the images are held in memory (arrays, or files decoded once into the cache): workers would
    only add start-up and IPC cost. Else up to 4, leaving one core to the training step: on 2 cores one
    worker decodes while the main process trains."""
    if isinstance(raw.images, np.ndarray) or raw.decoded is not None:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))

