"""The training loop: one code path for CPU, one GPU and ``torchrun`` (DDP) on many GPUs or nodes.

Determinism: every epoch reseeds the global RNGs and the DataLoader generator from ``(seed, epoch)``,
so a run resumed from last.pt replays the interrupted epoch exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import logging
import os
import random
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from kiln import __version__
from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess
from kiln.data import DataSpec, open_dataset
from kiln.errors import ConfigError, KilnError
from kiln.fsutil import atomic_path, atomic_write_json, atomic_write_text
from kiln.models import build_model, load_weights, model_entry, read_state_dict
from kiln.train import checkpoint
from kiln.train.config import TrainConfig
from kiln.train.tasks import Task, default_workers, make_task

log = logging.getLogger("kiln.train")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


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
        }


def init_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(d.local_rank)
    return torch.device("cuda", d.local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{DataSpec.parse(cfg.data).name}-{cfg.model}-{stamp}"


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
        pct = min(0.5, max(cfg.warmup_epochs / cfg.epochs, 0.05))
        return sched.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=total, pct_start=pct)
    warm = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
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


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if cfg.amp == "auto" else None


RESUME_OVERRIDES = frozenset({"epochs", "workers", "device"})


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it. See :func:`train`."""

    def __init__(self, cfg: TrainConfig | None = None, *, resume: Path | None = None,
                 overrides: dict[str, Any] | None = None, progress: bool = True) -> None:
        """Start a run from ``cfg``, or continue the run in ``resume`` with its saved config, where only
        the options in :data:`RESUME_OVERRIDES` may be changed through ``overrides``."""
        self.progress = progress
        self.resume_state: dict[str, Any] | None = None
        if resume is not None:
            bad = sorted(set(overrides or {}) - RESUME_OVERRIDES)
            if bad:
                raise ConfigError(f"--resume continues a run with its saved settings; only "
                                  f"{', '.join('--' + o.replace('_', '-') for o in sorted(RESUME_OVERRIDES))} may change "
                                  f"(got --{bad[0].replace('_', '-')})")
            self.resume_state = checkpoint.load(resume / checkpoint.LAST)
            saved = TrainConfig.from_dict(self.resume_state["config"])
            cfg = saved.replace(**(overrides or {}), out=str(resume), weights=None)
        elif cfg is None:
            cfg = TrainConfig(**(overrides or {}))
        self.dist = init_distributed("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = resolve_device(cfg.device, self.dist)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        train_raw, val_raw = open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                          skip_bad_images=cfg.skip_bad_images)
        data_task = train_raw.task
        if cfg.model and model_entry(cfg.model).task != data_task:
            raise ConfigError(f"--model {cfg.model} is a {model_entry(cfg.model).task} model but --data {cfg.data} "
                              f"is a {data_task} dataset")
        task_name = data_task if cfg.task == "auto" else cfg.task
        if task_name != data_task:
            raise ConfigError(f"--task {task_name} does not fit --data {cfg.data}, a {data_task} dataset")
        self.task: Task = make_task(task_name, len(train_raw.classes))
        if cfg.model is None:
            cfg = cfg.replace(model=self.task.default_model)
        self.batch_size: int = cfg.batch_size or self.task.default_batch_size
        cfg = cfg.replace(batch_size=self.batch_size)
        entry = model_entry(cfg.model or "")
        if cfg.out is None:
            cfg = cfg.replace(out=str(default_run_dir(cfg)))
        self.cfg = cfg
        self.run_dir = Path(cfg.out or ".")
        if resume is None and (self.run_dir / checkpoint.LAST).exists():
            raise ConfigError(f"--out {self.run_dir} already holds a run; resume it with --resume {self.run_dir} or pick another --out")
        self.classes = train_raw.classes
        self.train_raw, self.val_raw = train_raw, val_raw

        if self.resume_state is not None:
            self.pre = Preprocess.model_validate(self.resume_state["preprocess"])
        else:
            native = max(train_raw.native_size) if train_raw.native_size else None
            size = cfg.image_size or entry.default_size or (max(native, 32) if native else 224)
            self.pre = self.task.preprocess_spec(cfg, train_raw, size)
        channels = 1 if self.pre.channels == "L" else 3
        self.arch = Architecture(name=cfg.model or "", args={
            "num_classes": len(self.classes), "in_channels": channels, "image_size": self.pre.size[0],
            **self.task.model_args(cfg),
        })
        self.batch_range = BatchRange.parse(cfg.batch_range)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and on resume
        self.model = build_model(self.arch)
        if cfg.weights:
            skipped = load_weights(self.model, read_state_dict(cfg.weights), replace_head=True)
            if skipped:
                log.info("--weights %s: re-initialised %d tensor(s) whose shape differs (new head): %s",
                         cfg.weights, len(skipped), ", ".join(skipped[:4]))
        self.model.to(self.device)
        if cfg.channels_last and self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

        self.train_ds, self.val_ds = self.task.torch_datasets(cfg, train_raw, val_raw, self.pre)
        self.workers = cfg.workers if cfg.workers is not None else default_workers(train_raw)
        self.sampler: DistributedSampler[Any] | None = (DistributedSampler(self.train_ds, num_replicas=self.dist.world, rank=self.dist.rank,
                                           shuffle=True, seed=cfg.seed) if self.dist.enabled else None)
        self.steps_per_epoch = len(self._loader(0))
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.amp = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)  # type: ignore[assignment]
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, float] = {}
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.start_epoch = 0
        if self.resume_state is not None:
            self._restore(self.resume_state)

    # ---- data ------------------------------------------------------------------------------------

    def _loader(self, epoch: int) -> DataLoader:
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return DataLoader(
            self.train_ds, batch_size=self.batch_size, shuffle=self.sampler is None, sampler=self.sampler,
            num_workers=self.workers, pin_memory=self.device.type == "cuda", collate_fn=self.task.collate,
            generator=gen, drop_last=len(self.train_ds) > self.batch_size * self.dist.world,
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
        done_steps = int(state["epoch"]) * self.steps_per_epoch
        if int(state["config"]["epochs"]) == self.cfg.epochs:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            # --epochs changed: the saved schedule has the old length. Rebuild it for the new length from
            # the base learning rate and replay the steps already taken (no optimizer step is involved).
            for group in self.optimizer.param_groups:
                group["lr"] = group.get("initial_lr", self.cfg.learning_rate)
            self.scheduler = build_scheduler(self.cfg, self.optimizer, self.steps_per_epoch)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
                for _ in range(done_steps):
                    self.scheduler.step()
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
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
        main = self.dist.main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / "config.json", {**self.cfg.to_dict(), "preprocess": self.pre.model_dump(mode="json"),
                                                             "architecture": self.arch.model_dump(), "world_size": self.dist.world})
        writer = self._tensorboard() if main else None
        images = 0
        train_time = 0.0
        interrupted = False
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                seed_everything(self.cfg.seed * 1_000_003 + epoch)
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
            interrupted = True
            if main:
                done = len(self.history)
                log.warning("interrupted: %d complete epoch(s) saved in %s; continue with `kiln train --resume %s`",
                            done, self.run_dir / checkpoint.LAST, self.run_dir)
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
            raise TrainingInterrupted(result)
        return result

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
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
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
            self._write_metrics_csv()
            msg = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            log.info("%s%s", msg, "  *best*" if improved else "")
        return row

    # ---- outputs ---------------------------------------------------------------------------------

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; no TensorBoard events written (pip install tensorboard)")
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=self.start_epoch + 1)

    def _write_metrics_csv(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys.extend(k for k in row if k not in keys)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.history)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())

    def write_bundle(self) -> dict[str, str]:
        """Write model.pt (best weights), kiln.json and curves.png into the run folder."""
        state = self.best_state or {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        checkpoint.save(self.run_dir / "model.pt", dict(state))
        probe = build_model(self.arch)
        manifest = Manifest(
            kiln_version=__version__,
            task=self.task.name,  # type: ignore[arg-type]
            classes=self.classes,
            input=InputSpec(name="images", shape=[1 if self.pre.channels == "L" else 3, *self.pre.size],
                            dtype="float32", layout="NCHW", batch=self.batch_range),
            outputs=self.task.outputs(probe, len(self.classes)),
            preprocess=self.pre,
            postprocess=self.task.postprocess(),
            architecture=self.arch,
            training={
                "data": self.cfg.data, "val_fraction": self.cfg.val_fraction, "seed": self.cfg.seed,
                "epochs": len(self.history), "best_epoch": self.best_epoch, "config": self.cfg.to_dict(),
                "git_sha": git_sha(), "world_size": self.dist.world, "device": str(self.device),
                "torch": torch.__version__, "train_images": len(self.train_raw), "val_images": len(self.val_raw),
            },
        )
        # A fresh manifest: after more training, earlier evaluations and exported artifacts describe
        # other weights, so they are not carried over.
        bundle = Bundle(self.run_dir, manifest)
        old = self.run_dir / "kiln.json"
        bundle.add_artifact("model.pt", "torch", "fp32", metrics=self.best)
        bundle.save()
        curves = self.run_dir / "curves.png"
        plot_curves(self.history, curves, self.task.primary)
        return {"model": str(self.run_dir / "model.pt"), "manifest": str(old), "last": str(self.run_dir / checkpoint.LAST),
                "best": str(self.run_dir / checkpoint.BEST), "metrics_csv": str(self.run_dir / "metrics.csv"),
                "curves": str(curves), "tensorboard": str(self.run_dir / "tensorboard")}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C after at least one epoch: the bundle holds the best weights so far."""

    def __init__(self, result: RunResult) -> None:
        super().__init__("interrupted")
        self.result = result


def plot_curves(history: list[dict[str, Any]], path: Path, primary: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train")
    if "val_loss" in history[0]:
        ax1.plot(epochs, [r["val_loss"] for r in history], label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    if "train_acc" in history[0]:
        ax2.plot(epochs, [r["train_acc"] for r in history], label="train accuracy")
    ax2.plot(epochs, [r[f"val_{primary}"] for r in history], label=f"val {primary}")
    ax2.set(xlabel="epoch", ylabel="%" if primary == "top1" else primary, title=f"validation {primary}")
    ax2.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def _dist_cleanup() -> Iterator[None]:
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig | None = None, *, resume: str | os.PathLike[str] | None = None,
          overrides: dict[str, Any] | None = None, progress: bool = True) -> tuple[RunResult, Trainer]:
    """Train a run from ``cfg`` (or ``TrainConfig(**overrides)``), or continue the run in ``resume``.

    Returns the result and the trainer (for its resolved config and task).
    """
    with _dist_cleanup():
        trainer = Trainer(cfg, resume=Path(resume) if resume else None, overrides=overrides, progress=progress)
        return trainer.fit(), trainer
