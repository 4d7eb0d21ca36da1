"""Optimizer, learning-rate schedule and mixed-precision choice of a run, built from its TrainConfig."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from kiln.train.config import TrainConfig, warmup_epochs

log = logging.getLogger("kiln.train")


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


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
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


def resume_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int,
                     state: dict[str, Any]) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of a run resumed from the checkpoint ``state``, placed by progress: where
    ``state["epoch"]`` of ``cfg.epochs`` epochs falls, laid out over this run's ``steps_per_epoch``.

    The saved step count is not reused: a run resumed with another number of processes (or a longer
    ``--epochs``) takes another number of steps per epoch or in all, and the learning rate must still
    follow the same curve over the run. With the same steps per epoch this replays exactly the steps
    the uninterrupted run takes, so the rates are identical.
    """
    epoch, saved_epochs = int(state["epoch"]), int(state["config"]["epochs"])
    was = opt.param_groups[0]["lr"]
    scheduler = replay_scheduler(cfg, opt, steps_per_epoch, epoch * steps_per_epoch)
    if saved_epochs != cfg.epochs:
        log.info("--epochs %d -> %d: the %s schedule is rebuilt for %d epochs and replayed to the end of "
                 "epoch %d; the learning rate goes from %.3g (where it stopped) to %.3g (where the longer "
                 "schedule is now)",
                 saved_epochs, cfg.epochs, cfg.schedule, cfg.epochs, epoch, was, opt.param_groups[0]["lr"])
    saved_steps = int(state["scheduler"].get("last_epoch", 0)) // epoch if epoch else 0
    if saved_steps and saved_steps != steps_per_epoch:
        log.info("resumed with %d steps per epoch where the run took %d (another number of processes or "
                 "batch split): the learning rate continues from epoch %d of %d of the same curve (%.3g)",
                 steps_per_epoch, saved_steps, epoch, cfg.epochs, opt.param_groups[0]["lr"])
    return scheduler


def replay_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int,
                     done_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule for ``cfg.epochs``, advanced by ``done_steps`` without touching the weights.

    The schedule is rebuilt from each parameter group's peak rate (one-cycle keeps it as ``max_lr``,
    the others as ``initial_lr``) and the steps are replayed through torch's own schedulers.
    """
    for group in opt.param_groups:
        group["lr"] = group.get("max_lr", group.get("initial_lr", cfg.learning_rate))
        group.pop("initial_lr", None)
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
