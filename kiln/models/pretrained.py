"""Pretrained weights and the preprocessing that goes with them: torchvision's multi-weight API and timm.

Weights are fetched through each library's own cache (torchvision: ``$TORCH_HOME/hub/checkpoints``;
timm: the Hugging Face cache), so a file already there is used without any network. When it is not
there and there is no network, the error is one line naming the file and the folder to put it in.

The preprocessing is read from the weights (torchvision ``weights.transforms()``, timm's
``pretrained_cfg``) into a :class:`~kiln.bundle.Preprocess`: kiln.json records it and every stage
applies it through :mod:`kiln.processing`, so eval, export, predict and serving see what the weights
were trained on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torchvision

from kiln.bundle import Preprocess
from kiln.errors import CheckpointError, ConfigError, install_hint, unknown_choice

TIMM_PREFIX = "timm:"
# The architectures a kiln-det backbone or classifier may take weights from, for the error that lists them.
WEIGHTS_HINT = ("any torchvision classifier (torchvision.models.list_models()), timm:NAME, "
                "or a kiln-det-<backbone> detector")


def torchvision_weights(arch: str, which: str | bool = True) -> Any:
    """The ``WeightsEnum`` member of torchvision architecture ``arch``: ``True``/``"DEFAULT"`` for the
    recommended weights, or a member name such as ``IMAGENET1K_V2``."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ConfigError(
            f"--pretrained: {arch} has no pretrained weights; they exist for {WEIGHTS_HINT}") from None
    names = list(enum.__members__)
    key = "DEFAULT" if which is True else str(which)
    if "." in key:  # "ResNet50_Weights.IMAGENET1K_V2" as torchvision.models.get_weight spells it
        key = key.rsplit(".", 1)[1]
    if key not in enum.__members__:
        raise unknown_choice(f"weights for {arch}", key, names, flag="--pretrained")
    return enum[key]


def fetch_torchvision(weights: Any) -> dict[str, torch.Tensor]:
    """The state dict of ``weights`` through torch.hub's cache (downloaded once when online)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    name = os.path.basename(weights.url)
    try:
        # check_hash=False: a file placed in the cache by hand (offline machines) is taken as it is
        state = weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # URLError, HTTPError, socket errors: all mean "not fetched"
        raise CheckpointError(
            f"cannot fetch {name} ({type(exc).__name__}: {exc}); without network, download {weights.url} "
            f"and put it in {folder} (or pass the file with --weights)"
        ) from None
    return dict(state)


def torchvision_preprocess(weights: Any) -> Preprocess:
    """``weights.transforms()`` (resize the shorter side, centre crop, mean/std, interpolation) as
    kiln.json records it."""
    t = weights.transforms()
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0]) if getattr(t, "resize_size", None) else crop
    return Preprocess(mode="center_crop", size=(crop, crop), channels="RGB", mean=[float(v) for v in t.mean],
                      std=[float(v) for v in t.std], interpolation=str(t.interpolation.value),
                      resize_size=resize, source=f"torchvision:{weights}")


def timm_module() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"--model timm:NAME needs timm: {install_hint('timm')}") from None
    return timm


def timm_name(arch: str) -> str:
    """``timm:NAME`` -> ``NAME`` after checking timm knows it (a ``.tag`` picks one pretrained variant)."""
    timm = timm_module()
    name = arch.removeprefix(TIMM_PREFIX)
    base = name.split(".", 1)[0]
    known = timm.list_models()
    if base not in known:
        import difflib

        near = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
        hint = f" Nearest: {', '.join(TIMM_PREFIX + n for n in near)}." if near else ""
        raise ConfigError(
            f"--model: unknown timm model '{base}'.{hint} (timm.list_models() lists {len(known)})")
    return name


def fetch_timm(arch: str) -> dict[str, torch.Tensor]:
    """The pretrained state dict of timm model ``arch`` (``timm:NAME[.TAG]``) through the Hugging Face
    cache."""
    timm = timm_module()
    name = timm_name(arch)
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # huggingface_hub / urllib errors: all mean "not fetched"
        cfg = timm.models.get_pretrained_cfg(name)
        source = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or name
        raise CheckpointError(
            f"cannot fetch timm weights for {name} ({type(exc).__name__}); without network, download "
            f"model.safetensors of https://huggingface.co/{source} into the Hugging Face cache "
            f"({hf_cache()}) or pass the file with --weights"
        ) from None
    return dict(model.state_dict())


def hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")


def timm_preprocess(arch: str, model: Any | None = None) -> Preprocess:
    """timm's pretrained config (input size, crop_pct, interpolation, mean/std) as kiln.json records it."""
    timm = timm_module()
    name = timm_name(arch)
    if model is None:
        model = timm.create_model(name, pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    # timm's transforms_factory: scale_size = floor(size / crop_pct)
    resize = math.floor(min(h, w) / crop_pct)
    interp = cfg.get("interpolation", "bicubic")
    return Preprocess(mode="center_crop", size=(int(h), int(w)), channels="RGB",
                      mean=[float(v) for v in cfg["mean"]],
                      std=[float(v) for v in cfg["std"]],
                      interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bicubic",
                      resize_size=resize, source=f"timm:{name}")


def pretrained_state(arch: str, which: str | bool) -> tuple[dict[str, torch.Tensor], Preprocess]:
    """The pretrained weights of classifier ``arch`` and their preprocessing."""
    if arch.startswith(TIMM_PREFIX):
        if which is not True:
            raise ConfigError(
                f"--pretrained {which}: timm picks weights by tag in the name, e.g. "
                f"--model {arch}.<tag> --pretrained")
        return fetch_timm(arch), timm_preprocess(arch)
    weights = torchvision_weights(arch, which)
    return fetch_torchvision(weights), torchvision_preprocess(weights)


__all__ = [
    "TIMM_PREFIX",
    "fetch_timm",
    "fetch_torchvision",
    "hf_cache",
    "pretrained_state",
    "timm_module",
    "timm_name",
    "timm_preprocess",
    "torchvision_preprocess",
    "torchvision_weights",
]
