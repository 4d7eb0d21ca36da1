"""What ``kiln train`` and ``kiln eval`` decide and print besides their arguments: a full disk, eval
tables."""

from __future__ import annotations

import argparse
import errno
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.bundle import Bundle


def disk_full(exc: BaseException) -> bool:
    """A write that failed for want of space: ENOSPC/EDQUOT, or torch.save's own wording for it."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return "No space left on device" in text or "file write failed" in text


def disk_full_error(run_dir: Path) -> KilnError:
    where = run_dir.resolve()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return KilnError(f"the disk holding {where} is full ({free}); free some space or pass --out on another "
                     f"disk, then resume with --resume {run_dir} if a checkpoint was written")


def print_per_class(task: str, classes: list[str], metrics: dict[str, Any]) -> None:
    if task == "classify":
        worst = sorted(zip(classes, metrics["per_class"], strict=True), key=lambda t: t[1])[:3]
        print("  lowest per-class accuracy: " + ", ".join(f"{c} {a:.1f}%" for c, a in worst), file=sys.stderr)
        return
    aps = metrics.get("per_class_ap", {})
    print("  AP@[.5:.95] per class: " + ", ".join(
        f"{c} {'-' if aps.get(c) is None else f'{100 * aps[c]:.2f}'}" for c in classes), file=sys.stderr)


def artifact_tables(bundle: Bundle, args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The comparison table over exported artifacts and, with --bench, the accuracy/speed table."""
    from kiln.compare import Timing, artifact_table, format_speed_table, format_table

    m = bundle.manifest
    exported = any(a.format != "torch" for a in m.artifacts.values())
    if args.no_table and not args.bench or not (exported or args.bench):
        return None
    timing = Timing(batches=tuple(args.bench_batch), warmup=max(1, args.bench_iters // 10),
                    iters=args.bench_iters) if args.bench else None
    table = artifact_table(bundle, limit=args.limit, timing=timing)
    if exported and not args.no_table:
        print(format_table(table, m.task), file=sys.stderr)
    if args.bench:
        print(format_speed_table(table, m.task), file=sys.stderr)
    return table


def eval_slug(data: str, limit: int | None, controls: dict[str, Any] | None = None) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data).strip("_") or "data"
    name = f"{name}-first{limit}" if limit else name
    for key, value in sorted((controls or {}).items()):
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        name += "-" + re.sub(r"[^A-Za-z0-9_.,-]+", "_", f"{key}{text}")
    return name
