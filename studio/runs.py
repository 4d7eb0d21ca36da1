"""Runs as the workspace holds them: any folder with a ``config.json`` (training started) or a
``kiln.json`` (a bundle), whoever started it (the studio or ``kiln train`` in a terminal)."""

from __future__ import annotations

import contextlib
import csv
import json
import re
from pathlib import Path
from typing import Any

from kiln.studio.config import STATE_DIR

MAX_DEPTH = 3
LOG_TAIL_BYTES = 64 * 1024
# one tqdm update of the training loop's bar:
# "epoch 2/5:  40%|####   | 8/20 [00:01<00:02, 7.9it/s, loss=0.53, ...]"
_BAR = re.compile(
    r"epoch (\d+)/(\d+):\s+(\d+)%\|[^|]*\|\s*(\d+)/(\d+) "
    r"\[([\d:]+)<([\d:?]+)(?:[^\]]*?loss=([-+\d.eE]+))?[^\]]*\]")


def find_runs(workspace: Path) -> list[Path]:
    """Run folders under ``workspace`` (not inside another run, not in hidden folders), newest first."""
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            entries = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return
        for p in entries:
            if p.name.startswith(".") or p.name == STATE_DIR:
                continue
            if (p / "config.json").is_file() or (p / "kiln.json").is_file():
                found.append(p)
            elif depth < MAX_DEPTH:
                walk(p, depth + 1)

    walk(workspace, 1)
    return sorted(found, key=_mtime, reverse=True)


def _mtime(p: Path) -> float:
    for name in ("metrics.csv", "config.json", "kiln.json"):
        with contextlib.suppress(OSError):
            return (p / name).stat().st_mtime
    return 0.0


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.csv (one row per finished epoch, written by the training loop), numbers as floats."""
    try:
        text = (run_dir / "metrics.csv").read_text()
    except OSError:
        return []
    rows = []
    for row in csv.DictReader(text.splitlines()):
        out: dict[str, Any] = {}
        for k, v in row.items():
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                out[k] = v
        rows.append(out)
    return rows


def summary(run_dir: Path, rel: str) -> dict[str, Any]:
    """What the runs table shows, from the folder alone."""
    cfg = read_json(run_dir / "config.json")
    manifest = read_json(run_dir / "kiln.json")
    training = manifest.get("training", {})
    cfg = cfg or training.get("config", {})
    rows = read_metrics(run_dir)
    arts = manifest.get("artifacts", {})
    best: dict[str, Any] = {}
    if "model.pt" in arts:
        best = arts["model.pt"].get("metrics", {}) or {}
    return {
        "run": rel,
        "task": manifest.get("task") or cfg.get("task"),
        "model": cfg.get("model") or manifest.get("architecture", {}).get("name"),
        "data": cfg.get("data"),
        "epochs": int(cfg.get("epochs") or training.get("epochs") or 0),
        "epochs_done": len(rows),
        "best": best,
        "bundle": bool(manifest) and (run_dir / "model.pt").is_file(),
        "resumable": (run_dir / "last.pt").is_file(),
        "artifacts": [{"file": name, "format": a.get("format"), "precision": a.get("precision"),
                       "size": _size(run_dir / name),
                       "metrics": a.get("metrics") or {}} for name, a in arts.items()],
        "params": training.get("parameters"),  # written by the training loop (model_cost)
        "gflops": training.get("gflops"),
        "classes": manifest.get("classes", []),
        "mtime": _mtime(run_dir),
    }


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size
    except OSError:
        return None


def raw_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    """The last ``limit`` bytes of a log as written (progress bar updates and all)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def tail(path: Path, limit: int = LOG_TAIL_BYTES, data: str | None = None) -> str:
    """The end of a log, with progress bars' carriage-return updates collapsed to their latest."""
    data = raw_tail(path, limit) if data is None else data
    return "\n".join(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
                     for line in data.split("\n"))


def progress(log_text: str) -> dict[str, Any] | None:
    """The latest progress bar update in a training log: epoch, batches, running loss, tqdm's estimate."""
    last = None
    for m in _BAR.finditer(log_text):
        last = m
    if last is None:
        return None
    epoch, epochs, _pct, n, total, elapsed, remaining, loss = last.groups()
    return {"epoch": int(epoch), "epochs": int(epochs), "batch": int(n), "batches": int(total),
            "elapsed_s": _clock(elapsed), "remaining_s": _clock(remaining),
            "loss": float(loss) if loss else None}


def step_points(log_text: str) -> list[list[float]]:
    """``[epoch + fraction, running loss]`` for every progress update that carries a loss."""
    points = []
    for m in _BAR.finditer(log_text):
        epoch, _e, _p, n, total, *_rest, loss = m.groups()
        if loss and int(total):
            points.append([int(epoch) - 1 + int(n) / int(total), float(loss)])
    return points


def _clock(text: str) -> float | None:
    if "?" in text:
        return None
    secs = 0.0
    for part in text.split(":"):
        secs = secs * 60 + float(part)
    return secs


def eta_seconds(rows: list[dict[str, Any]], epochs: int, prog: dict[str, Any] | None) -> float | None:
    """Seconds left: the remaining epochs at the mean epoch time so far (validation included, through
    the row times' spacing when known), less the part of the current epoch already done."""
    done = len(rows)
    if epochs <= done:
        return 0.0
    frac = 0.0
    if prog and prog["epoch"] == done + 1 and prog["batches"]:
        frac = prog["batch"] / prog["batches"]
    if rows:
        per_epoch = sum(float(r.get("epoch_s", 0.0)) for r in rows) / done
    elif prog and prog["elapsed_s"] is not None and frac > 0:
        per_epoch = prog["elapsed_s"] / frac
    else:
        return None
    return max(0.0, (epochs - done - frac) * per_epoch)
