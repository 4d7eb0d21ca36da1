"""The training loop: one code path for CPU, one GPU and ``torchrun`` (DDP) on many GPUs or nodes.

Determinism: every epoch reseeds the global RNGs and the DataLoader generator from ``(seed, epoch)``,
so a run resumed from last.pt replays the interrupted epoch exactly as an uninterrupted run would.

A :class:`Trainer` is built in two steps: :func:`~kiln.train.resolve.resolve_settings` fills in every
default from the config and the dataset, then :meth:`Trainer._build` makes the model, data loaders,
optimizer and schedule. Run-folder outputs live in :mod:`kiln.train.run`, the optimizer and schedule in
:mod:`kiln.train.optim`, process groups and devices in :mod:`kiln.train.device`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from kiln import __version__
from kiln.bundle import Architecture, BatchRange, Preprocess
from kiln.data import open_dataset
from kiln.errors import ConfigError, KilnError
from kiln.models import build_model, load_weights, read_state_dict
from kiln.train import checkpoint, finetune
from kiln.train.config import TrainConfig
from kiln.train.device import (
    Dist,
    configure_kernels,
    dist_cleanup,
    init_distributed,
    resolve_device,
    seed_everything,
)
from kiln.train.interrupt import StopRequest, stop_on_sigint
from kiln.train.optim import amp_dtype, build_optimizer, build_scheduler, resume_scheduler
from kiln.train.resolve import (
    RESUME_OVERRIDES,
    Settings,
    check_resume_overrides,
    resolve_settings,
    resumed_config,
)
from kiln.train.run import (
    bundle_manifest,
    open_tensorboard,
    run_files,
    world_sizes,
    write_bundle,
    write_config,
    write_metrics_csv,
)
from kiln.train.tasks import Task
from kiln.train.throttle import throttle_warning

log = logging.getLogger("kiln.train")

__all__ = ["RESUME_OVERRIDES", "Dist", "RunResult", "Trainer", "TrainingInterrupted", "train"]


@dataclass
class RunResult:
    run_dir: Path
    best: dict[str, float]
    best_epoch: int
    history: list[dict[str, Any]]
    seconds: float
    images_per_s: float
    interrupted: bool = False
    files: dict[str, str] = field(default_factory=dict)
    up_to_date: bool = False  # a resumed run that had nothing left to train: nothing was written

    def summary(self, cfg: TrainConfig, task: str) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "bundle": str(self.run_dir),
            "task": task,
            "model": cfg.model,
            "data": cfg.data,
            "epochs": len(self.history),
            "best_epoch": self.best_epoch,
            "metrics": self.best,
            "final": self.history[-1] if self.history else {},
            "timings": {"total_s": round(self.seconds, 3), "train_images_per_s": round(self.images_per_s, 1)},
            "files": self.files,
            "interrupted": self.interrupted,
            "up_to_date": self.up_to_date,
        }


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it. See :func:`train`."""

    def __init__(self, cfg: TrainConfig | None = None, *, resume: Path | None = None,
                 overrides: dict[str, Any] | None = None, progress: bool = True) -> None:
        """Start a run from ``cfg``, or continue the run in ``resume`` with its saved config, where only
        the options in :data:`RESUME_OVERRIDES` may be changed through ``overrides``."""
        self.progress = progress
        self.resume_state: dict[str, Any] | None = None
        saved_pre: Preprocess | None = None
        if resume is not None:
            check_resume_overrides(overrides)  # before reading the checkpoint: a usage error costs nothing
            self.resume_state = checkpoint.load(resume / checkpoint.LAST)
            cfg = resumed_config(self.resume_state["config"], resume, overrides)
            saved_pre = Preprocess.model_validate(self.resume_state["preprocess"])
        elif cfg is None:
            cfg = TrainConfig(**(overrides or {}))
        self.dist = init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = resolve_device(cfg.device, self.dist)
        configure_kernels(cfg, self.device)
        self.train_raw, self.val_raw = open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                                    skip_bad_images=cfg.skip_bad_images)
        self.settings: Settings = resolve_settings(cfg, self.train_raw, preprocess=saved_pre)
        if resume is None and (self.run_dir / checkpoint.LAST).exists():
            raise ConfigError(f"--out {self.run_dir} already holds a run; resume it with --resume {self.run_dir} or pick another --out")
        self._build()
        self.history: list[dict[str, Any]] = []
        self._stop = StopRequest()  # replaced by fit() while it trains
        self.best: dict[str, float] = {}
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.start_epoch = 0
        self.throttle_warned = False
        if self.resume_state is not None:
            self._restore(self.resume_state)

    # The resolved settings, under the names the loop and its callers use.

    @property
    def cfg(self) -> TrainConfig:
        return self.settings.cfg

    @property
    def task(self) -> Task:
        return self.settings.task

    @property
    def pre(self) -> Preprocess:
        return self.settings.pre

    @property
    def arch(self) -> Architecture:
        return self.settings.arch

    @property
    def classes(self) -> list[str]:
        return self.settings.classes

    @property
    def batch_range(self) -> BatchRange:
        return self.settings.batch_range

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def workers(self) -> int:
        return self.settings.workers

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir

    def _build(self) -> None:
        """The model (DDP-wrapped and compiled as asked), datasets, sampler, optimizer and schedule."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and on resume
        self.model = build_model(self.arch)
        if self.resume_state is None:  # a resumed run restores its own weights
            finetune.init_pretrained(self.model, self.arch, cfg)
        if cfg.weights:
            fresh = finetune.fresh_head(self.model, cfg, list(self.classes))
            skipped = load_weights(self.model, read_state_dict(cfg.weights), replace_head=True, ignore=fresh) + list(fresh)
            if skipped:
                log.info("--weights %s: re-initialised %d tensor(s) whose shape differs (new head): %s",
                         cfg.weights, len(skipped), ", ".join(skipped[:4]))
        self.model.to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.train_ds, self.val_ds = self.task.torch_datasets(cfg, self.train_raw, self.val_raw, self.pre)
        self.sampler: DistributedSampler[Any] | None = (
            DistributedSampler(self.train_ds, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True, seed=cfg.seed)
            if self.dist.enabled else None)
        self.steps_per_epoch = len(self._loader(0))
        self.optimizer = build_optimizer(cfg, finetune.param_groups(self.model, cfg, cfg.learning_rate))
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.amp = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)  # type: ignore[assignment]

    # ---- data ------------------------------------------------------------------------------------

    def _loader(self, epoch: int) -> DataLoader:
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return DataLoader(
            self.train_ds, batch_size=self.dist.split_batch(self.batch_size), shuffle=self.sampler is None,
            sampler=self.sampler,
            num_workers=self.workers, pin_memory=self.device.type == "cuda", collate_fn=self.task.collate,
            generator=gen, drop_last=len(self.train_ds) > self.batch_size,
            persistent_workers=False,
        )

    def val_loader(self) -> DataLoader:
        return DataLoader(self.val_ds, batch_size=max(64, self.batch_size), shuffle=False,
                          num_workers=self.workers, collate_fn=self.task.collate,
                          pin_memory=self.device.type == "cuda")

    # ---- state -----------------------------------------------------------------------------------

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        if self.start_epoch < self.cfg.epochs:  # by progress, whatever the steps per epoch (kiln.train.optim)
            self.scheduler = resume_scheduler(self.cfg, self.optimizer, self.steps_per_epoch, state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.history = list(state.get("history", []))
        self.best = dict(state.get("best", {}))
        self.best_epoch = int(state.get("best_epoch", 0))
        best_path = self.run_dir / checkpoint.BEST
        if best_path.is_file():
            self.best_state = read_state_dict(best_path)
        checkpoint.set_rng_state(state["rng"])
        log.info("resumed %s at epoch %d/%d", self.run_dir, self.start_epoch, self.cfg.epochs)

    def _checkpoint(self, epoch: int) -> None:
        checkpoint.save(self.run_dir / checkpoint.LAST, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "history": self.history,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "rng": checkpoint.rng_state(),
            "config": self.cfg.to_dict(),
            "preprocess": self.pre.model_dump(mode="json"),
            "kiln_version": __version__,
        })

    # ---- the loop --------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        t0 = time.perf_counter()
        if self.start_epoch >= self.cfg.epochs:
            return self._up_to_date(t0)
        main = self.dist.main
        if main:
            write_config(self.settings, self.dist.world)
        writer = open_tensorboard(self.run_dir, self.start_epoch) if main else None
        images = 0
        train_time = 0.0
        interrupted = False
        try:
            with stop_on_sigint() as self._stop:
                for epoch in range(self.start_epoch, self.cfg.epochs):
                    self._stop.check()
                    seed_everything(self.cfg.seed * 1_000_003 + epoch)
                    finetune.set_epoch(self.model, self.cfg, epoch)
                    stats, seconds = self._train_epoch(epoch)
                    images += int(stats["count"])
                    train_time += seconds
                    row = self._end_epoch(epoch, stats, seconds)
                    if main and writer is not None:
                        for k, v in row.items():
                            if k != "epoch" and isinstance(v, int | float):
                                writer.add_scalar(k, v, epoch + 1)
                        writer.flush()
        except KeyboardInterrupt:
            interrupted = True  # the command says how to continue (TrainingInterrupted), once
            if not self.history:
                raise
        finally:
            if writer is not None:
                writer.close()
        files: dict[str, str] = {}
        if main and self.history:
            files = self.write_bundle()
        if self.dist.enabled:
            dist.barrier()
        result = RunResult(self.run_dir, self.best, self.best_epoch, self.history, time.perf_counter() - t0,
                           images / train_time if train_time else 0.0, interrupted, files)
        if interrupted:
            raise TrainingInterrupted(result, main=main)
        return result

    def _up_to_date(self, t0: float) -> RunResult:
        """A resumed run with no epoch left: its folder already is the result, so nothing is rewritten
        (model.pt would get a new hash, and kiln.json would lose the exported artifacts it lists)."""
        if self.dist.main and not self._bundle_complete():
            log.info("%s: all %d epochs are in %s but the bundle is incomplete; writing it",
                     self.run_dir, self.start_epoch, checkpoint.LAST)
            files = self.write_bundle()
        else:
            files = run_files(self.run_dir)
            if self.dist.main:
                log.info("%s already holds %d trained epoch(s) (--epochs %d): nothing to train, nothing on disk changed; "
                         "pass a larger --epochs to train further", self.run_dir, self.start_epoch, self.cfg.epochs)
        if self.dist.enabled:
            dist.barrier()
        rate = self.history[-1].get("images_per_s", 0.0) if self.history else 0.0
        return RunResult(self.run_dir, self.best, self.best_epoch, self.history, time.perf_counter() - t0,
                         float(rate), files=files, up_to_date=True)

    def _bundle_complete(self) -> bool:
        """Whether model.pt and kiln.json were written after the last epoch (a kill can fall between)."""
        try:
            manifest = json.loads((self.run_dir / "kiln.json").read_text())
        except (OSError, ValueError):
            return False
        return (self.run_dir / "model.pt").is_file() and manifest.get("training", {}).get("epochs") == len(self.history)

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        self.net.train()
        loader = self._loader(epoch)
        totals: dict[str, float] = {}
        start = time.perf_counter()
        bar = self._bar(loader, epoch)
        for batch in bar:
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss, stats = self.task.step(self.net, batch, self.device)
            if not torch.isfinite(loss):
                raise KilnError(f"training diverged at epoch {epoch + 1} (loss is {loss.item()}); lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self._stop.check()  # Ctrl-C: stop here, between batches (kiln.train.interrupt)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            if hasattr(bar, "set_postfix") and totals.get("count"):
                elapsed = time.perf_counter() - start
                post = {"loss": f"{totals.get('loss_sum', 0) / totals['count']:.4f}"}
                if "correct" in totals:
                    post["acc"] = f"{100 * totals['correct'] / totals['count']:.1f}%"
                post["img/s"] = f"{totals['count'] * self.dist.world / max(elapsed, 1e-9):.0f}"
                bar.set_postfix(post, refresh=False)
        seconds = time.perf_counter() - start
        if self.dist.enabled:
            keys = sorted(totals)
            t = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            totals = dict(zip(keys, t.tolist(), strict=True))
        return totals, seconds

    def _bar(self, loader: DataLoader, epoch: int) -> Any:
        if not (self.progress and self.dist.main):
            return loader
        from tqdm import tqdm

        return tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", file=sys.stderr, leave=False,
                    dynamic_ncols=True, mininterval=0.5)

    def _end_epoch(self, epoch: int, totals: dict[str, float], seconds: float) -> dict[str, Any]:
        count = max(totals.get("count", 0.0), 1.0)
        row: dict[str, Any] = {"epoch": epoch + 1, "world_size": self.dist.world, "lr": self.optimizer.param_groups[0]["lr"],
                               "train_loss": totals.get("loss_sum", 0.0) / count}
        if "correct" in totals:
            row["train_acc"] = 100.0 * totals["correct"] / count
        if self.dist.main:
            val = self.task.evaluate(self.model, self.val_loader(), self.device)
            row.update({f"val_{k}": v for k, v in val.items()})
        row["images_per_s"] = count / max(seconds, 1e-9)
        row["epoch_s"] = seconds
        self.history.append(row)
        if self.dist.main:
            primary = row[f"val_{self.task.primary}"]
            improved = not self.best or primary > self.best[self.task.primary]
            if improved:
                self.best = {k.removeprefix("val_"): v for k, v in row.items() if k.startswith("val_")}
                self.best_epoch = epoch + 1
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                checkpoint.save(self.run_dir / checkpoint.BEST, copy.copy(self.best_state))
            self._checkpoint(epoch + 1)
            write_metrics_csv(self.history, self.run_dir / "metrics.csv")
            msg = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            log.info("%s%s", msg, "  *best*" if improved else "")
            self._warn_if_throttled()
        return row

    def _warn_if_throttled(self) -> None:
        if self.throttle_warned:
            return
        warning = throttle_warning([float(r.get("images_per_s", 0.0)) for r in self.history])
        if warning:
            self.throttle_warned = True  # once per run: every later epoch would repeat it
            log.warning("%s", warning)

    # ---- outputs ---------------------------------------------------------------------------------

    def write_bundle(self) -> dict[str, str]:
        """Write model.pt (best weights), kiln.json and curves.png into the run folder."""
        state = self.best_state or {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        manifest = bundle_manifest(self.settings, build_model(self.arch), {
            "epochs": len(self.history), "best_epoch": self.best_epoch, **world_sizes(self.history, self.dist.world),
            "device": str(self.device), "train_images": len(self.train_raw), "val_images": len(self.val_raw),
        })
        return write_bundle(self.settings, manifest, state, self.best, self.history)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C after at least one epoch: the bundle holds the best weights so far."""

    def __init__(self, result: RunResult, *, main: bool = True) -> None:
        super().__init__("interrupted")
        self.result = result
        self.main = main  # rank 0 of a process group, or the only process: the one that reports


def train(cfg: TrainConfig | None = None, *, resume: str | os.PathLike[str] | None = None,
          overrides: dict[str, Any] | None = None, progress: bool = True) -> tuple[RunResult, Trainer]:
    """Train a run from ``cfg`` (or ``TrainConfig(**overrides)``), or continue the run in ``resume``.

    Returns the result and the trainer (for its resolved config and task).
    """
    with dist_cleanup():
        trainer = Trainer(cfg, resume=Path(resume) if resume else None, overrides=overrides, progress=progress)
        return trainer.fit(), trainer
