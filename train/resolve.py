"""Resolving a run's settings: every default of a :class:`TrainConfig` filled in from the task, the model
and the dataset, before anything is built. Nothing here touches the disk or builds a model."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.bundle import Architecture, BatchRange, Preprocess
from kiln.data import DataSpec, ImageDataset
from kiln.data.inspect import InputSize, data_image_size, steps_per_epoch
from kiln.errors import ConfigError
from kiln.models import model_entry
from kiln.train.config import TrainConfig, default_batch_size, default_warmup_epochs
from kiln.train.finetune import fit_preprocess
from kiln.train.tasks import Task, default_workers, make_task

# What `--resume` may change: everything else would make the continued run a different run.
RESUME_OVERRIDES = frozenset({"epochs", "workers", "device"})


@dataclass(frozen=True)
class Settings:
    """A run's resolved settings. ``cfg`` has its model, batch size and run folder filled in."""

    cfg: TrainConfig
    task: Task
    classes: list[str]
    pre: Preprocess
    arch: Architecture
    batch_range: BatchRange
    workers: int
    input_size: InputSize  # the input side and why it was chosen

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out or ".")

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size or 1  # always filled in by resolve_settings


def check_resume_overrides(overrides: dict[str, Any] | None) -> None:
    bad = sorted(set(overrides or {}) - RESUME_OVERRIDES)
    if bad:
        allowed = ", ".join("--" + o.replace("_", "-") for o in sorted(RESUME_OVERRIDES))
        raise ConfigError(f"--resume continues a run with its saved settings; only {allowed} may change "
                          f"(got --{bad[0].replace('_', '-')})")


def resumed_config(saved: dict[str, Any], run_dir: Path, overrides: dict[str, Any] | None) -> TrainConfig:
    """The saved config of the run in ``run_dir`` with the allowed ``overrides`` applied."""
    check_resume_overrides(overrides)
    return TrainConfig.from_dict(saved).replace(**(overrides or {}), out=str(run_dir), weights=None)


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{DataSpec.parse(cfg.data).name}-{cfg.model}-{stamp}"


def resolve_settings(cfg: TrainConfig, train_raw: ImageDataset, *,
                     preprocess: Preprocess | None = None) -> Settings:
    """Check that ``cfg`` fits the dataset and fill in what it leaves open.

    ``preprocess`` is the resumed run's saved preprocessing; a new run derives it from the training data.
    """
    data_task = train_raw.task
    if cfg.model and model_entry(cfg.model).task != data_task:
        raise ConfigError(f"--model {cfg.model} is a {model_entry(cfg.model).task} model but --data "
                          f"{cfg.data} is a {data_task} dataset")
    task_name = data_task if cfg.task == "auto" else cfg.task
    if task_name != data_task:
        raise ConfigError(f"--task {task_name} does not fit --data {cfg.data}, a {data_task} dataset")
    task = make_task(task_name, len(train_raw.classes))
    if cfg.model is None:
        cfg = cfg.replace(model=task.default_model)
    cfg = cfg.replace(batch_size=cfg.batch_size or default_batch_size(task_name, len(train_raw)))
    if cfg.warmup_epochs is None:
        steps = steps_per_epoch(len(train_raw), cfg.batch_size or 1)
        cfg = cfg.replace(warmup_epochs=default_warmup_epochs(cfg.epochs, steps))
    if cfg.out is None:
        cfg = cfg.replace(out=str(default_run_dir(cfg)))
    if preprocess is None:
        chosen = input_size(cfg, train_raw)
        task_pre = task.preprocess_spec(cfg, train_raw, chosen.size or 224)
        preprocess = fit_preprocess(cfg, task_pre)  # pretrained weights' recipe
        if preprocess.size != task_pre.size:
            chosen = InputSize(preprocess.size[0], "model",
                               f"the preprocessing of --pretrained {cfg.pretrained} weights")
    else:
        chosen = InputSize(preprocess.size[0], "resume", "the resumed run's")
    arch = Architecture(name=cfg.model or "", args={
        "num_classes": len(train_raw.classes), "in_channels": 1 if preprocess.channels == "L" else 3,
        "image_size": preprocess.size[0], **task.model_args(cfg),
    })
    workers = cfg.workers if cfg.workers is not None else default_workers(train_raw)
    return Settings(cfg, task, list(train_raw.classes), preprocess, arch, BatchRange.parse(cfg.batch_range),
                    workers,
                    chosen)


def input_size(cfg: TrainConfig, train_raw: ImageDataset) -> InputSize:
    """The input side of a new run, and why: ``--image-size``; else, for folder sets, the data's typical
    size (:func:`kiln.data.inspect.data_image_size`) raised to what the model takes; else the model's
    default side; else the side of in-memory images; else 224."""
    if cfg.image_size:
        return InputSize(cfg.image_size, "option", "--image-size")
    entry = model_entry(cfg.model or "")
    data = data_image_size(train_raw)
    if data is not None and data.size and not train_raw.native_size:
        if data.size < entry.min_size:
            return InputSize(entry.min_size, "model",
                             f"{data.reason}; raised to {entry.min_size}, the smallest "
                                                      f"input {cfg.model} takes")
        return data
    if entry.default_size:
        return InputSize(entry.default_size, "model", f"{cfg.model}'s default input side")
    if data is not None and data.size:
        return data
    return InputSize(224, "default", "no size from the model or the data")
