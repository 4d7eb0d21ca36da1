"""Checkpoints of a run: last.pt (everything to resume exactly) and best.pt, written atomically.

last.pt is read with ``torch.load(weights_only=True)``: unpickling a file given to ``--resume`` must not
run code from it. A checkpoint holds only tensors, numbers, strings and containers of them; the numpy
RNG state is stored as a tensor so no further types need allowing. Checkpoints from earlier versions hold
it as a numpy array, whose three reconstruction types (data, not code) are allowed too.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from kiln import __version__
from kiln.errors import CheckpointError
from kiln.fsutil import atomic_path

LAST = "last.pt"
BEST = "best.pt"
REQUIRED = ("model", "optimizer", "scheduler", "epoch", "config", "rng")


def _legacy_numpy_globals() -> list[Any]:
    """numpy array types in checkpoints written before the numpy RNG state became a tensor."""
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray.multiarray._reconstruct]


def rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss),
                  float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else key
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(model: nn.Module, optimizer: Optimizer, scheduler: Any, scaler: torch.amp.GradScaler, *,
                   epoch: int, record: dict[str, Any], config: dict[str, Any],
                   preprocess: dict[str, Any]) -> dict[str, Any]:
    """What last.pt holds after ``epoch`` epochs: weights, optimizer, schedule, loss scaler, the RNGs, the
    run's ``record`` (history, best metrics, best epoch), its config and preprocessing."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": epoch,
        **record,
        "rng": rng_state(),
        "config": config,
        "preprocess": preprocess,
        "kiln_version": __version__,
    }


def restore_training(state: dict[str, Any], model: nn.Module, optimizer: Optimizer,
                     scaler: torch.amp.GradScaler) -> None:
    """Load a :func:`training_state` into the run's parts and set the RNGs as they were."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def save(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: Path) -> dict[str, Any]:
    """Read a full training checkpoint without running anything stored in it."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (is this a kiln run folder?)")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({_first_line(exc)})") from None
    if not isinstance(obj, dict) or not set(REQUIRED) <= obj.keys():
        missing = [k for k in REQUIRED if k not in obj] if isinstance(obj, dict) else list(REQUIRED)
        raise CheckpointError(
            f"checkpoint {path} is not a kiln training checkpoint (missing {', '.join(missing)})")
    return obj


def _refused(path: Path, exc: Exception) -> CheckpointError:
    """The one-line error for a pickle that refers to code, naming what it refers to (read, not run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        names = []
    if not names:
        return CheckpointError(f"checkpoint {path} is corrupt or unreadable ({_first_line(exc)})")
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return CheckpointError(f"checkpoint {path} is not a kiln training checkpoint: it refers to {shown}, "
                           "which a kiln checkpoint never holds (not loaded, nothing in it was run)")


def _first_line(exc: Exception) -> str:
    """The cause in one line. torch's weights-only errors wrap it in advice (reload with
    weights_only=False) that is exactly what must not be done with a file of unknown origin."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
