"""Fine-tuning from pretrained weights: the weights' preprocessing, loading them, learning-rate groups
and freezing the backbone for the first epochs.

A run calls six functions and knows nothing else about fine-tuning: :func:`check_pretrained` (before
the dataset is read, :class:`kiln.train.loop.Trainer`), :func:`fit_preprocess` (before the architecture
is fixed, :func:`kiln.train.resolve.resolve_settings`), :func:`init_pretrained` and :func:`fresh_head`
(after the model is built, :func:`kiln.train.build.run_model`), :func:`param_groups` (for the optimizer)
and :func:`set_epoch` (at the start of every epoch, ``Trainer._train_one_epoch``).

"Backbone" is everything but the head: for a kiln-det detector its ``backbone`` module (the FPN and
the detection head are new), for a classifier every parameter outside its last classification layer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.bundle import MANIFEST, Architecture, Bundle, Manifest, Preprocess
from kiln.errors import BundleError, ConfigError
from kiln.models import load_pretrained, model_entry
from kiln.models.backbones import TorchvisionBackbone
from kiln.models.detector import TV_BACKBONES
from kiln.models.pretrained import (
    TIMM_PREFIX,
    WEIGHTS_HINT,
    fetch_torchvision,
    timm_preprocess,
    torchvision_preprocess,
    torchvision_weights,
)
from kiln.train.config import TrainConfig

log = logging.getLogger("kiln.train")

DET_PREFIX = "kiln-det-"


def _backbone_arch(model_name: str) -> str | None:
    """The torchvision classifier inside a kiln-det-<backbone> name, else None."""
    name = model_name.removeprefix(DET_PREFIX)
    return name if model_name.startswith(DET_PREFIX) and name in TV_BACKBONES else None


def weights_preprocess(cfg: TrainConfig) -> Preprocess | None:
    """The preprocessing of ``cfg.pretrained``'s weights (read from the library, nothing downloaded)."""
    if not cfg.pretrained or not cfg.model:
        return None
    if cfg.model.startswith(TIMM_PREFIX):
        return timm_preprocess(cfg.model)
    arch = _backbone_arch(cfg.model) or cfg.model
    own_trunk = model_entry(cfg.model).task == "detect" and _backbone_arch(cfg.model) is None
    if own_trunk or cfg.model == "lenet5":
        raise ConfigError(
            f"--pretrained: {cfg.model} has no pretrained weights; they exist for {WEIGHTS_HINT}")
    return torchvision_preprocess(
        torchvision_weights(arch, True if cfg.pretrained == "DEFAULT" else cfg.pretrained))


def check_pretrained(cfg: TrainConfig) -> None:
    """Fail now, before the dataset is read, when ``cfg.pretrained`` cannot be had: an architecture
    without weights, an unknown weights name, or a torchvision file neither in torch.hub's cache nor
    downloadable (fetching it here also fills the cache :func:`init_pretrained` reads)."""
    if not cfg.pretrained or not cfg.model:
        return
    weights_preprocess(cfg)
    if cfg.model.startswith(TIMM_PREFIX):
        return
    weights = torchvision_weights(_backbone_arch(cfg.model) or cfg.model,
                                  True if cfg.pretrained == "DEFAULT" else cfg.pretrained)
    if not (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)).is_file():
        fetch_torchvision(weights)


def fit_preprocess(cfg: TrainConfig, task_pre: Preprocess) -> Preprocess:
    """The preprocessing a run records in kiln.json: the task's (from the dataset) without pretrained
    weights; with them, a classifier takes the weights' whole recipe (resize, crop, mean/std,
    interpolation; ``--image-size`` sets the crop and scales the resize with it) and a detector keeps
    its letterbox but takes the weights' mean/std and RGB input."""
    pre = weights_preprocess(cfg)
    if pre is None:
        source = weights_bundle(cfg)
        if source is not None and len(source.preprocess.mean) == len(task_pre.mean):
            # The features were learned on inputs normalized this way: keep it, or they see other numbers.
            return task_pre.model_copy(update={"mean": source.preprocess.mean, "std": source.preprocess.std})
        return task_pre
    if task_pre.mode == "letterbox":
        return task_pre.model_copy(
            update={"channels": "RGB", "mean": pre.mean, "std": pre.std, "source": pre.source})
    if cfg.image_size:
        ratio = (pre.resize_size or pre.size[0]) / pre.size[0]
        pre = pre.model_copy(
            update={"size": (cfg.image_size, cfg.image_size), "resize_size": round(cfg.image_size * ratio)})
    return pre


def weights_bundle(cfg: TrainConfig) -> Manifest | None:
    """The kiln.json beside ``--weights`` when the file is a kiln bundle's model.pt, else None."""
    if not cfg.weights:
        return None
    folder = Path(cfg.weights).expanduser().parent
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return Bundle.load(folder).manifest
    except BundleError:
        return None


def fresh_head(model: nn.Module, cfg: TrainConfig, classes: list[str]) -> tuple[str, ...]:
    """Head parameters ``--weights`` must not fill: a kiln bundle's head for other classes means other
    outputs even when their count is the same (digits 0-4 are not digits 5-9). Other files (a torchvision
    or timm download) are judged by shape in :func:`kiln.models.load_weights`."""
    source = weights_bundle(cfg)
    if source is None or source.classes == classes:
        return ()
    return tuple(sorted(head_parameters(model)))


def init_pretrained(model: nn.Module, arch: Architecture, cfg: TrainConfig) -> None:
    """Load ``cfg.pretrained``'s weights into ``model`` (its new head stays freshly initialized)."""
    if not cfg.pretrained:
        return
    which: str | bool = True if cfg.pretrained == "DEFAULT" else cfg.pretrained
    pre, fresh = load_pretrained(model, arch, which)
    log.info("--pretrained: loaded %s%s", pre.source or cfg.pretrained,
             f"; new head for {arch.args.get('num_classes')} classes: {', '.join(fresh)}" if fresh else "")


def head_parameters(model: nn.Module) -> set[str]:
    """Names of the head's parameters (see the module docstring)."""
    names = [n for n, _ in model.named_parameters()]
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone,
                  nn.Module) and (isinstance(backbone, TorchvisionBackbone) or hasattr(model, "fpn")):
        return {n for n in names if not n.startswith("backbone.")}
    get_classifier = getattr(model, "get_classifier", None)  # timm models name their head
    if callable(get_classifier):
        head = get_classifier()
        ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        return {n for n, p in model.named_parameters() if id(p) in ids}
    last = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))][-1]
    return {n for n in names if n.startswith(f"{last}.")}


def param_groups(model: nn.Module, cfg: TrainConfig, lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the backbone at ``lr * cfg.backbone_lr_scale``, the head at ``lr``.
    One group when the scale is 1, so plain runs keep their optimizer state layout."""
    params = list(model.named_parameters())
    if cfg.backbone_lr_scale == 1.0:
        return [{"params": [p for _, p in params], "lr": lr}]
    head = head_parameters(model)
    return [
        {"params": [p for n, p in params if n not in head], "lr": lr * cfg.backbone_lr_scale,
         "name": "backbone"},
        {"params": [p for n, p in params if n in head], "lr": lr, "name": "head"},
    ]


def set_epoch(model: nn.Module, cfg: TrainConfig, epoch: int) -> None:
    """Freeze the backbone for epochs ``0 .. cfg.freeze_backbone - 1`` and unfreeze it afterwards.

    Frozen parameters get no gradient, so the optimizer leaves them (and their state) alone; calling
    this at every epoch start also restores the right state when a run resumes mid-way.
    """
    if cfg.freeze_backbone <= 0:
        return
    frozen = epoch < cfg.freeze_backbone
    head = head_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in head or not frozen)
    if epoch in (0, cfg.freeze_backbone):
        log.info("epoch %d: backbone %s", epoch + 1,
                 "frozen (training the head only)" if frozen else "unfrozen")


__all__ = ["check_pretrained", "fit_preprocess", "fresh_head", "head_parameters", "weights_bundle",
           "init_pretrained", "param_groups", "set_epoch", "weights_preprocess"]
