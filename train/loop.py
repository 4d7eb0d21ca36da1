"""The training loop: one code path for CPU, one GPU and ``torchrun`` (DDP) on many GPUs or nodes.

It reads top to bottom: :func:`train` builds a :class:`Trainer` and calls :meth:`Trainer.fit`, which
runs :meth:`~Trainer._train_one_epoch`, then :meth:`~Trainer._end_epoch` (which calls
:meth:`~Trainer._evaluate`, keeps the best weights and checkpoints) for every epoch left, then writes the
bundle. Everything else is beside it, not in it: resolving the settings in :mod:`kiln.train.resolve`,
building the model and loaders in :mod:`kiln.train.build`, checkpoints in :mod:`kiln.train.checkpoint`,
what is logged in :mod:`kiln.train.progress`, run-folder outputs in :mod:`kiln.train.run`, process
groups and devices in :mod:`kiln.train.device`, the optimizer and schedule in :mod:`kiln.train.optim`.

Determinism: every epoch reseeds the global RNGs and the DataLoader generator from ``(seed, epoch)``,
so a run resumed from last.pt replays the interrupted epoch exactly as an uninterrupted run would.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.bundle import Preprocess
from kiln.data import open_dataset
from kiln.data.dataset import collect_skipped
from kiln.data.inspect import summarize
from kiln.errors import ConfigError, KilnError
from kiln.models import build_model, read_state_dict
from kiln.train import build, checkpoint, finetune
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
from kiln.train.progress import eta, log_epoch, log_plan, progress_bar, show_running, write_scalars
from kiln.train.resolve import (
    RESUME_OVERRIDES,
    check_resume_overrides,
    resolve_settings,
    resumed_config,
)
from kiln.train.run import (
    bundle_manifest,
    open_tensorboard,
    plot_curves,
    run_files,
    world_sizes,
    write_bundle,
    write_config,
    write_metrics_csv,
)
from kiln.train.stats import chance_warning
from kiln.train.throttle import throttle_warning

log = logging.getLogger("kiln.train")

__all__ = ["RESUME_OVERRIDES", "Dist", "RunResult", "Trainer", "TrainingInterrupted", "train"]


def train(cfg: TrainConfig | None = None, *, resume: str | os.PathLike[str] | None = None,
          overrides: dict[str, Any] | None = None, progress: bool = True) -> tuple[RunResult, Trainer]:
    """Train a run from ``cfg`` (or ``TrainConfig(**overrides)``), or continue the run in ``resume``.

    Returns the result and the trainer (for its resolved config and task).
    """
    with dist_cleanup():
        trainer = Trainer(cfg, resume=Path(resume) if resume else None, overrides=overrides,
                          progress=progress)
        return trainer.fit(), trainer


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
    warnings: list[str] = field(default_factory=list)  # about the data and the run (see Trainer.warnings)
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
            "warnings": self.warnings,
        }


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C after at least one epoch: the bundle holds the best weights so far."""

    def __init__(self, result: RunResult, *, main: bool = True) -> None:
        super().__init__("interrupted")
        self.result = result
        self.main = main  # rank 0 of a process group, or the only process: the one that reports


class Trainer:
    """One run: everything it needs, built from a :class:`TrainConfig`, and :meth:`fit`. See :func:`train`."""

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
        if resume is None:
            finetune.check_pretrained(cfg)  # before the dataset is read: a missing weights file costs nothing
        self.dist = init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = resolve_device(cfg.device, self.dist)
        configure_kernels(cfg, self.device)
        with collect_skipped() as skipped:
            self.train_raw, self.val_raw = open_dataset(cfg.data, val_fraction=cfg.val_fraction,
                                                        seed=cfg.seed,
                                                        skip_bad_images=cfg.skip_bad_images)

        # The resolved settings: every default filled in from the config, the model and the data.
        s = self.settings = resolve_settings(cfg, self.train_raw, preprocess=saved_pre)
        self.cfg, self.task, self.pre, self.run_dir = s.cfg, s.task, s.pre, s.run_dir
        self.batch_size, self.workers = s.batch_size, s.workers
        if resume is None and (self.run_dir / checkpoint.LAST).exists():
            raise ConfigError(f"--out {self.run_dir} already holds a run; resume it with --resume "
                              f"{self.run_dir} "
                              "or pick another --out")
        self.data_summary = summarize(self.cfg.data, self.train_raw, self.val_raw, s.input_size,
                                      self.batch_size, skipped)  # a global batch: steps as with one process
        if self.dist.main:
            log_plan(self.data_summary, s)

        # What trains: the model, its data, the optimizer and schedule, the network forward runs through.
        self.model, self.cost = build.run_model(s, self.device, resumed=resume is not None,
                                                main=self.dist.main)
        self.train_ds, self.val_ds = self.task.torch_datasets(self.cfg, self.train_raw, self.val_raw,
                                                              self.pre)
        self.train_loader, self.sampler, self.train_gen = build.train_loader(s, self.train_ds, self.dist,
                                                                             self.device)
        self.val_loader = build.val_loader(s, self.val_ds, self.device)
        self.bn_batches = build.bn_loader(s, self.model, self.train_raw)
        self.steps_per_epoch = len(self.train_loader)
        self.optimizer = build_optimizer(self.cfg,
                                         finetune.param_groups(self.model, self.cfg, self.cfg.learning_rate))
        self.scheduler = build_scheduler(self.cfg, self.optimizer, self.steps_per_epoch)
        self.amp = amp_dtype(self.cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.net = build.network(self.model, s, self.dist, self.device)

        # The run's record: what every epoch measured, and the best epoch so far.
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, float] = {}
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.start_epoch = 0
        self.throttle_warned = False
        self.chance_warned = False
        self.warnings: list[str] = list(self.data_summary.warnings)
        self._stop = StopRequest()  # replaced by fit() while it trains
        if self.resume_state is not None:
            self._restore(self.resume_state)

    # ---- the loop --------------------------------------------------------------------------------

    def fit(self) -> RunResult:
        """Train every epoch left, then write the bundle (rank 0). Ctrl-C after an epoch raises
        :class:`TrainingInterrupted` with the bundle of the best epoch so far written."""
        t0 = self.fit_started = time.perf_counter()
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
                    totals, seconds = self._train_one_epoch(epoch)
                    images += int(totals["count"])
                    train_time += seconds
                    row = self._end_epoch(epoch, totals, seconds)
                    write_scalars(writer, row)
        except KeyboardInterrupt:
            interrupted = True  # the command says how to continue (TrainingInterrupted), once
            if not self.history:
                raise
        finally:
            if writer is not None:
                writer.close()
        files = self.write_bundle() if main and self.history else {}
        self.dist.barrier()
        result = RunResult(self.run_dir, self.best, self.best_epoch, self.history, time.perf_counter() - t0,
                           images / train_time if train_time else 0.0, interrupted, files, self.warnings)
        if interrupted:
            raise TrainingInterrupted(result, main=main)
        return result

    def _train_one_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        """One pass over the training data; returns the summed step statistics of every rank (``count``,
        ``loss_sum``, ``correct``...) and this rank's seconds."""
        seed_everything(self.cfg.seed * 1_000_003 + epoch)
        finetune.set_epoch(self.model, self.cfg, epoch)
        self.net.train()
        totals: dict[str, float] = {}
        start = time.perf_counter()
        bar = progress_bar(self._seeded_loader(epoch), epoch, self.cfg.epochs,
                           shown=self.progress and self.dist.main)
        for batch in bar:
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                enabled=self.amp is not None):
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
            show_running(bar, totals, start, self.dist.world)
        seconds = time.perf_counter() - start
        return self.dist.sum_over_ranks(totals, self.device), seconds

    def _evaluate(self) -> dict[str, float]:
        """The validation metrics of the current weights (rank 0), after precise-BN."""
        self._precise_bn()
        return self.task.evaluate(self.model, self.val_loader, self.device)

    def _end_epoch(self, epoch: int, totals: dict[str, float], seconds: float) -> dict[str, Any]:
        """The epoch's row of metrics.csv; on rank 0, also validate, keep the best weights, checkpoint,
        write the metrics and curves, and log the epoch."""
        count = max(totals.get("count", 0.0), 1.0)
        row: dict[str, Any] = {"epoch": epoch + 1, "world_size": self.dist.world,
                               "lr": self.optimizer.param_groups[0]["lr"],
                               "train_loss": totals.get("loss_sum", 0.0) / count}
        if "correct" in totals:
            row["train_acc"] = 100.0 * totals["correct"] / count
        if self.dist.main:
            row.update({f"val_{k}": v for k, v in self._evaluate().items()})
        row["images_per_s"] = count / max(seconds, 1e-9)
        row["epoch_s"] = seconds
        self.history.append(row)
        if self.dist.main:
            improved = self._keep_if_best(row)
            self._save_checkpoint(epoch + 1)
            write_metrics_csv(self.history, self.run_dir / "metrics.csv")
            # to watch while it trains
            plot_curves(self.history, self.run_dir / "curves.png", self.task.primary)
            log_epoch(row, improved=improved,
                      eta=eta(epoch, self.cfg.epochs, self.start_epoch, self.fit_started))
            self._warn_if_throttled()
            self._warn_if_at_chance(final=epoch + 1 == self.cfg.epochs)
        return row

    # ---- the steps' parts ------------------------------------------------------------------------

    def _seeded_loader(self, epoch: int) -> Any:
        """The training loader, its shuffle seeded from ``(seed, epoch)``. With ``--workers 0`` (the default
        for images held in memory) augmentation is seeded per epoch too, so a resumed run replays an epoch
        exactly."""
        self.train_gen.manual_seed(self.cfg.seed * 100_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return self.train_loader

    def _precise_bn(self) -> None:
        """Re-estimate BatchNorm statistics on training images before validation (precise-BN).

        Training updates them with momentum from its own batches, so on small sets (few, small batches,
        augmented) they lag the weights and evaluation-mode outputs collapse to one class. One pass in
        training mode without gradients over a fixed sample sets them to the cumulative average, as
        ``torch.optim.swa_utils.update_bn`` does; the bundle's weights carry them.
        """
        if self.bn_batches is None:
            return
        torch.optim.swa_utils.update_bn(self.bn_batches, self.model, self.device)

    def _keep_if_best(self, row: dict[str, Any]) -> bool:
        """Keep the weights of an epoch that improves the task's primary metric (in memory and best.pt)."""
        primary = self.task.primary
        if self.best and not row[f"val_{primary}"] > self.best[primary]:
            return False
        self.best = {k.removeprefix("val_"): v for k, v in row.items() if k.startswith("val_")}
        self.best_epoch = int(row["epoch"])
        self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        checkpoint.save(self.run_dir / checkpoint.BEST, copy.copy(self.best_state))
        return True

    def _save_checkpoint(self, epoch: int) -> None:
        record = {"history": self.history, "best": self.best, "best_epoch": self.best_epoch}
        checkpoint.save(self.run_dir / checkpoint.LAST, checkpoint.training_state(
            self.model, self.optimizer, self.scheduler, self.scaler, epoch=epoch, record=record,
            config=self.cfg.to_dict(), preprocess=self.pre.model_dump(mode="json")))

    def _restore(self, state: dict[str, Any]) -> None:
        checkpoint.restore_training(state, self.model, self.optimizer, self.scaler)
        self.start_epoch = int(state["epoch"])
        if self.start_epoch < self.cfg.epochs:  # by progress, whatever the steps per epoch (kiln.train.optim)
            self.scheduler = resume_scheduler(self.cfg, self.optimizer, self.steps_per_epoch, state)
        self.history = list(state.get("history", []))
        self.best = dict(state.get("best", {}))
        self.best_epoch = int(state.get("best_epoch", 0))
        best_path = self.run_dir / checkpoint.BEST
        if best_path.is_file():
            self.best_state = read_state_dict(best_path)
        log.info("resumed %s at epoch %d/%d", self.run_dir, self.start_epoch, self.cfg.epochs)

    def _warn_if_at_chance(self, final: bool) -> None:
        if self.chance_warned or self.task.name != "classify":
            return
        counts = list(self.data_summary.val.per_class.values())
        warning = chance_warning(self.history, counts, final=final, precise_bn=self.cfg.precise_bn,
                                 data=self.cfg.data)
        if warning:
            self.chance_warned = True
            self.warnings.append(warning)
            log.warning("%s", warning)

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
        manifest = bundle_manifest(self.settings, build_model(self.settings.arch), {
            "epochs": len(self.history), "best_epoch": self.best_epoch,
            **world_sizes(self.history, self.dist.world),
            **self.cost,
            "device": str(self.device), "train_images": len(self.train_raw), "val_images": len(self.val_raw),
            # where a dataset's class list came from, when its reader says (VOC: classes.txt or annotations)
            **({"classes_from": self.train_raw.info["classes_from"]} if "classes_from" in self.train_raw.info
               else {}),
        })
        return write_bundle(self.settings, manifest, state, self.best, self.history)

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
                log.info("%s already holds %d trained epoch(s) (--epochs %d): nothing to train, nothing on "
                         "disk changed; pass a larger --epochs to train further", self.run_dir,
                         self.start_epoch,
                         self.cfg.epochs)
        self.dist.barrier()
        rate = self.history[-1].get("images_per_s", 0.0) if self.history else 0.0
        return RunResult(self.run_dir, self.best, self.best_epoch, self.history, time.perf_counter() - t0,
                         float(rate), files=files, up_to_date=True)

    def _bundle_complete(self) -> bool:
        """Whether model.pt and kiln.json were written after the last epoch (a kill can fall between)."""
        try:
            manifest = json.loads((self.run_dir / "kiln.json").read_text())
        except (OSError, ValueError):
            return False
        return (self.run_dir / "model.pt").is_file() and manifest.get("training",
                                                                      {}).get("epochs") == len(self.history)
