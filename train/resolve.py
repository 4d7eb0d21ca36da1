"""Resolving a run's settings: every default of a :class:`TrainConfig` filled in from the task, the model
and the dataset, before anything is built. Nothing here touches the disk or builds a model."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.bundle import Architecture, BatchRange, Preprocess
from kiln.data import DataSpec, ImageDataset
from kiln.errors import ConfigError
from kiln.models import model_entry
from kiln.train.config import TrainConfig
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

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out or ".")

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size or self.task.default_batch_size


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


def resolve_settings(cfg: TrainConfig, train_raw: ImageDataset, *, preprocess: Preprocess | None = None) -> Settings:
    """Check that ``cfg`` fits the dataset and fill in what it leaves open.

    ``preprocess`` is the resumed run's saved preprocessing; a new run derives it from the training data.
    """
    data_task = train_raw.task
    if cfg.model and model_entry(cfg.model).task != data_task:
        raise ConfigError(f"--model {cfg.model} is a {model_entry(cfg.model).task} model but --data {cfg.data} "
                          f"is a {data_task} dataset")
    task_name = data_task if cfg.task == "auto" else cfg.task
    if task_name != data_task:
        raise ConfigError(f"--task {task_name} does not fit --data {cfg.data}, a {data_task} dataset")
    task = make_task(task_name, len(train_raw.classes))
    if cfg.model is None:
        cfg = cfg.replace(model=task.default_model)
    cfg = cfg.replace(batch_size=cfg.batch_size or task.default_batch_size)
    if cfg.out is None:
        cfg = cfg.replace(out=str(default_run_dir(cfg)))
    if preprocess is None:
        native = max(train_raw.native_size) if train_raw.native_size else None
        size = cfg.image_size or model_entry(cfg.model or "").default_size or (max(native, 32) if native else 224)
        preprocess = fit_preprocess(cfg, task.preprocess_spec(cfg, train_raw, size))  # pretrained weights' recipe
    arch = Architecture(name=cfg.model or "", args={
        "num_classes": len(train_raw.classes), "in_channels": 1 if preprocess.channels == "L" else 3,
        "image_size": preprocess.size[0], **task.model_args(cfg),
    })
    workers = cfg.workers if cfg.workers is not None else default_workers(train_raw)
    return Settings(cfg, task, list(train_raw.classes), preprocess, arch, BatchRange.parse(cfg.batch_range), workers)
