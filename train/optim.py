"""Optimizer, learning-rate schedule and mixed-precision choice of a run, built from its TrainConfig."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from kiln.train.config import TrainConfig, warmup_epochs


def build_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    lr, wd = cfg.learning_rate, cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule; ``warmup_epochs`` of linear warm-up precede it (onecycle has its own)."""
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":
        pct = min(0.5, max(warmup_epochs(cfg, steps_per_epoch) / cfg.epochs, 0.05))
        # Adagrad has neither momentum nor betas to cycle; without this onecycle + adagrad fails to start.
        cycle = "momentum" in opt.defaults or "betas" in opt.defaults
        # per group: a backbone group keeps its --backbone-lr-scale share of the peak
        peaks = [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
        return sched.OneCycleLR(opt, max_lr=peaks, total_steps=total, pct_start=pct, cycle_momentum=cycle)
    warm = min(int(warmup_epochs(cfg, steps_per_epoch) * steps_per_epoch), total - 1)
    rest = total - warm
    main: sched.LRScheduler
    if cfg.schedule == "constant":
        main = sched.LambdaLR(opt, lambda _: 1.0)
    elif cfg.schedule == "step":
        main = sched.StepLR(opt, step_size=max(1, rest // 3), gamma=0.1)
    else:
        main = sched.CosineAnnealingLR(opt, T_max=max(1, rest), eta_min=cfg.learning_rate * 0.01)
    if warm <= 0:
        return main
    warmup = sched.LinearLR(opt, start_factor=0.01, end_factor=1.0, total_iters=warm)
    return sched.SequentialLR(opt, [warmup, main], milestones=[warm])


def replay_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int,
                     done_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule for ``cfg.epochs``, advanced by ``done_steps`` without touching the weights.

    Used when ``--epochs`` changes on resume: the saved schedule has the old length, so it is rebuilt
    from the base learning rate for the new length and the steps already taken are replayed.
    """
    for group in opt.param_groups:
        group["lr"] = group.get("initial_lr", cfg.learning_rate)
    scheduler = build_scheduler(cfg, opt, steps_per_epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
        for _ in range(done_steps):
            scheduler.step()
    return scheduler


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if cfg.amp == "auto" else None
