"""Checkpoints of a run: last.pt (everything to resume exactly) and best.pt, written atomically."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.errors import CheckpointError
from kiln.fsutil import atomic_path

LAST = "last.pt"
BEST = "best.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load(path: Path) -> dict[str, Any]:
    """Read a full training checkpoint (it holds RNG and optimizer state, so not weights_only)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (is this a kiln run folder?)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})") from None
    required = {"model", "optimizer", "scheduler", "epoch", "config", "rng"}
    if not isinstance(obj, dict) or not required <= obj.keys():
        missing = sorted(required - set(obj)) if isinstance(obj, dict) else sorted(required)
        raise CheckpointError(f"checkpoint {path} is not a kiln training checkpoint (missing {', '.join(missing)})")
    return obj
