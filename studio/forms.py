"""The New run form as ``kiln train`` arguments: the same options, checked by the same ``TrainConfig``."""

from __future__ import annotations

import re
import shlex
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

from kiln.data import DataSpec
from kiln.errors import ConfigError
from kiln.studio.paths import confine
from kiln.train.config import DEFAULT_LR, MODEL_NAMES, OPTIMIZERS, SCHEDULES, TASKS, TrainConfig

INTS = ("epochs", "batch_size", "image_size", "workers", "seed", "freeze_backbone")
FLOATS = ("lr", "warmup_epochs", "weight_decay", "label_smoothing", "val_fraction", "backbone_lr_scale",
          "grad_clip")
STRINGS = ("data", "model", "task", "optimizer", "schedule", "device", "pretrained")
BOOLS = ("skip_bad_images",)
FORM_FIELDS = (*STRINGS, *INTS, *FLOATS, *BOOLS)
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
RUNS_DIR = "runs"
__all__ = ["MODEL_NAMES", "command_line", "form_defaults", "parse_form", "run_name", "train_argv"]


def form_defaults() -> dict[str, Any]:
    """The defaults ``kiln train`` uses before it sees the data (TrainConfig's), and the choices."""
    d = {f.name: f.default for f in fields(TrainConfig) if f.name in FORM_FIELDS}
    return {"values": d, "default_lr": DEFAULT_LR, "models": list(MODEL_NAMES),
            "optimizers": list(OPTIMIZERS),
            "schedules": list(SCHEDULES), "tasks": list(TASKS)}


def parse_form(form: dict[str, Any], roots: tuple[Path, ...]) -> dict[str, Any]:
    """The options the form gives (blank fields left to kiln train), typed; ``--data`` paths confined to
    ``roots`` and made absolute. Raises ConfigError (or PathRefused) naming the field."""
    unknown = sorted(set(form) - set(FORM_FIELDS) - {"name"})
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]}")
    given: dict[str, Any] = {}
    for key in FORM_FIELDS:
        value = form.get(key)
        if value is None or value == "" or value is False:
            continue
        try:
            if key in INTS:
                given[key] = int(value)
            elif key in FLOATS:
                given[key] = float(value)
            elif key in BOOLS:
                given[key] = bool(value)
            else:
                given[key] = str(value).strip()
        except (TypeError, ValueError):
            raise ConfigError(f"--{key.replace('_', '-')}: invalid value {value!r}") from None
    if "data" in given:
        spec = DataSpec.parse(given["data"])
        given["data"] = str(DataSpec(spec.name, tuple(str(confine(a, roots)) for a in spec.args)))
    TrainConfig(**given)  # the checks kiln train makes before it starts
    return given


def run_name(form: dict[str, Any], given: dict[str, Any]) -> str:
    name = str(form.get("name") or "").strip()
    if not name:
        data = DataSpec.parse(given.get("data", "digits")).name
        name = f"{data}-{given.get('model', 'default').replace(':', '-')}-{datetime.now():%Y%m%d-%H%M%S}"
    if not RUN_NAME.match(name):
        raise ConfigError(f"run name {name!r}: letters, digits, '.', '_' and '-' only")
    return name


def train_argv(given: dict[str, Any], out: str) -> list[str]:
    """``kiln train`` arguments: ``--flag=value`` (a value can never be read as another flag)."""
    argv = ["train"]
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        argv.append(flag if value is True else f"{flag}={value}")
    argv.append(f"--out={out}")
    return argv


def command_line(argv: list[str]) -> str:
    return shlex.join(["kiln", *argv])
