"""What a run tells the person watching it: the plan before anything is built, a progress bar per
epoch, one log line per epoch with the time left, and TensorBoard scalars. Only rank 0 calls these;
nothing here changes what is trained."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from torch.utils.data import DataLoader

from kiln.data.inspect import DatasetSummary
from kiln.train.resolve import Settings

log = logging.getLogger("kiln.train")


def log_plan(summary: DatasetSummary, s: Settings) -> None:
    """The dataset summary and the choices made from it, before anything is built."""
    for line in summary.format():
        if line.startswith("  input size") and s.input_size.source != "option":
            line += "; --image-size changes it"
        if not line.startswith("  warning:"):
            log.info("%s", line)
    for warning in summary.warnings:
        log.warning("%s", warning)
    cfg = s.cfg
    log.info("  %d epochs, warm-up %.2g epoch(s) (--warmup-epochs), precise-BN %s", cfg.epochs,
             cfg.warmup_epochs,
             "on (for models with BatchNorm)" if cfg.precise_bn else "off")


def progress_bar(loader: DataLoader, epoch: int, epochs: int, *, shown: bool) -> Any:
    """``loader`` itself, or a tqdm bar over it on stderr when ``shown``."""
    if not shown:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr, leave=False, dynamic_ncols=True,
                mininterval=0.5)


def show_running(bar: Any, totals: dict[str, float], started: float, world: int) -> None:
    """The epoch's running loss, accuracy and images per second (all ranks) on the bar, if it is one."""
    if not hasattr(bar, "set_postfix") or not totals.get("count"):
        return
    elapsed = time.perf_counter() - started
    post = {"loss": f"{totals.get('loss_sum', 0) / totals['count']:.4f}"}
    if "correct" in totals:
        post["acc"] = f"{100 * totals['correct'] / totals['count']:.1f}%"
    post["img/s"] = f"{totals['count'] * world / max(elapsed, 1e-9):.0f}"
    bar.set_postfix(post, refresh=False)


def log_epoch(row: dict[str, Any], *, improved: bool, eta: str) -> None:
    msg = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
    log.info("%s%s%s", msg, "  *best*" if improved else "", eta)


def eta(epoch: int, epochs: int, start_epoch: int, started: float) -> str:
    """The whole run's time left, from the epochs (with validation) done in this process so far."""
    left = epochs - epoch - 1
    done = epoch + 1 - start_epoch
    if left <= 0 or done <= 0:
        return ""
    per_epoch = (time.perf_counter() - started) / done
    return f"  eta {duration(per_epoch * left)}"


def duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def write_scalars(writer: Any, row: dict[str, Any]) -> None:
    """One epoch's numbers as TensorBoard scalars at step ``row["epoch"]``; ``writer`` may be None."""
    if writer is None:
        return
    for k, v in row.items():
        if k != "epoch" and isinstance(v, int | float):
            writer.add_scalar(k, v, row["epoch"])
    writer.flush()
