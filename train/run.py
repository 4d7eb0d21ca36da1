"""What a run writes into its folder besides checkpoints: config.json, metrics.csv, TensorBoard events,
curves.png, and the bundle (model.pt + kiln.json). Only rank 0 calls these."""

from __future__ import annotations

import csv
import io
import logging
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln import __version__
from kiln.bundle import Bundle, InputSpec, Manifest
from kiln.figures import new_figure, save_figure
from kiln.fsutil import atomic_write_json, atomic_write_text
from kiln.train import checkpoint
from kiln.train.resolve import Settings

log = logging.getLogger("kiln.train")


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_config(s: Settings, world: int) -> None:
    s.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(s.run_dir / "config.json",
                      {**s.cfg.to_dict(), "preprocess": s.pre.model_dump(mode="json"),
                                                  "architecture": s.arch.model_dump(), "world_size": world})


def open_tensorboard(run_dir: Path, start_epoch: int) -> Any:
    """A SummaryWriter that drops events after ``start_epoch`` (a resumed run rewrites them), or None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed; no TensorBoard events written (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_epoch + 1)


def write_metrics_csv(history: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write_text(path, buf.getvalue())


def plot_curves(history: list[dict[str, Any]], path: Path, primary: str) -> None:
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = new_figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
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
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def run_files(run_dir: Path) -> dict[str, str]:
    """The files a finished run folder holds, as reported in the summary."""
    return {"model": str(run_dir / "model.pt"), "manifest": str(run_dir / "kiln.json"),
            "last": str(run_dir / checkpoint.LAST), "best": str(run_dir / checkpoint.BEST),
            "metrics_csv": str(run_dir / "metrics.csv"), "curves": str(run_dir / "curves.png"),
            "tensorboard": str(run_dir / "tensorboard")}


def world_sizes(history: list[dict[str, Any]], world: int) -> dict[str, Any]:
    """How many processes trained the run, for kiln.json: ``world_size`` (this process group's, which
    trained the last epoch) and ``world_sizes``, one entry per stretch of epochs trained with one world size
    (a run resumed with another number of processes has several; epochs saved before world sizes were
    recorded have ``null``)."""
    spans: list[dict[str, Any]] = []
    for row in history:
        size = row.get("world_size")
        if spans and spans[-1]["world_size"] == size:
            spans[-1]["last_epoch"] = row["epoch"]
        else:
            spans.append({"first_epoch": row["epoch"], "last_epoch": row["epoch"], "world_size": size})
    return {"world_size": world, "world_sizes": spans}


def bundle_manifest(s: Settings, probe: nn.Module, training: dict[str, Any]) -> Manifest:
    """The manifest of the run's bundle; ``probe`` is a model of the run's architecture (for its outputs)."""
    return Manifest(
        kiln_version=__version__,
        task=s.task.name,
        classes=s.classes,
        input=InputSpec(name="images", shape=[1 if s.pre.channels == "L" else 3, *s.pre.size],
                        dtype="float32", layout="NCHW", batch=s.batch_range),
        outputs=s.task.outputs(probe, len(s.classes)),
        preprocess=s.pre,
        postprocess=s.task.postprocess(),
        architecture=s.arch,
        training={"data": s.cfg.data, "val_fraction": s.cfg.val_fraction, "seed": s.cfg.seed,
                  "config": s.cfg.to_dict(), "git_sha": git_sha(), "torch": torch.__version__, **training},
    )


def write_bundle(s: Settings, manifest: Manifest, state: dict[str, torch.Tensor], best: dict[str, float],
                 history: list[dict[str, Any]]) -> dict[str, str]:
    """Write model.pt (``state``), kiln.json and curves.png into the run folder."""
    checkpoint.save(s.run_dir / "model.pt", dict(state))
    # A fresh manifest: after more training, earlier evaluations and exported artifacts describe
    # other weights, so they are not carried over.
    bundle = Bundle(s.run_dir, manifest)
    bundle.add_artifact("model.pt", "torch", "fp32", metrics=best)
    bundle.save()
    plot_curves(history, s.run_dir / "curves.png", s.task.primary)
    return run_files(s.run_dir)
