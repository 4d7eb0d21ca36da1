"""The model registry: name -> a builder of an ``nn.Module`` from (classes, channels, input size, args).

kiln's own entries (lenet5, the resnets and mobilenet_v3_small adapted to small inputs, the kiln-det
detectors) come first; any other torchvision classifier is taken by its name
(``torchvision.models.list_models(module=torchvision.models)``) and timm models as ``timm:NAME``.
Builders never download: pretrained weights are loaded afterwards (:mod:`kiln.models.pretrained`), so
``load_model(bundle)`` rebuilds the same module offline. Small inputs (<= 64 px) give kiln's resnets a
stride-1 stem so a 32x32 image is not reduced to 1x1.
``kiln.json`` records the name and arguments, so ``load_model(bundle)`` rebuilds the same module.

Training builds from this registry and the PyTorch backend and export rebuild from it, so it lives in
core. It imports torch: modules that must run without torch (bundle, processing, kiln.runtime, serve)
import it only where a torch model is actually built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from kiln.bundle import Architecture, Bundle, Preprocess
from kiln.errors import CheckpointError, ConfigError
from kiln.models.backbones import TorchvisionBackbone, adapt_in_channels, load_classifier_weights
from kiln.models.detector import TV_BACKBONES, build_detector
from kiln.models.pretrained import WEIGHTS_HINT, pretrained_state, timm_module, timm_name


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling; 28x28 inputs give the classic 16x5x5 map."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((5, 5)),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int, **_: Any) -> nn.Module:
        model = getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=num_classes)
        if image_size <= 64:
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return model

    return build


def _mobilenet_v3_small(num_classes: int, in_channels: int, image_size: int, **_: Any) -> nn.Module:
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    stride = 1 if image_size <= 64 else 2
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride, 1, bias=False)
    return model


def _lenet5(num_classes: int, in_channels: int, **_: Any) -> nn.Module:
    return LeNet5(num_classes, in_channels)


def _detector(size: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int, **kw: Any) -> nn.Module:
        return build_detector(size, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                              **kw)

    return build


# Auxiliary classifiers only train-time losses use; kiln trains one head, so they are left out.
_NO_AUX = {"inception_v3": {"aux_logits": False, "init_weights": True},
           "googlenet": {"aux_logits": False, "init_weights": True}}


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, image_size: int = 224, **_: Any) -> nn.Module:
        kw: dict[str, Any] = dict(_NO_AUX.get(name, {}))
        if name.startswith("vit_"):
            kw["image_size"] = image_size  # ViT's position embedding is sized for the input
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
        return adapt_in_channels(model, in_channels) if in_channels != 3 else model

    return build


def _timm(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, image_size: int = 224, **_: Any) -> nn.Module:
        timm = timm_module()
        name = timm_name(arch)
        kw: dict[str, Any] = {}
        cfg = timm.models.get_pretrained_cfg(name)
        if ((cfg is not None and getattr(cfg, "fixed_input_size", False))
                or name.startswith(("vit_", "deit", "eva"))):
            kw["img_size"] = image_size  # position embeddings are sized for the input
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)

    return build


def torchvision_classifiers() -> list[str]:
    """Every classification architecture torchvision builds (not detection, segmentation or video)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]
    task: str
    default_size: int | None  # input side when the dataset does not fix one
    min_size: int = 1  # the smallest input side the architecture takes


def _torchvision_min_size(name: str) -> int:
    """torchvision's own record of the smallest input of ``name`` (its weights' ``min_size``: 75 for
    inception_v3, 224 for the ViTs, 1 for most), read from the library without downloading anything."""
    try:
        weights = list(torchvision.models.get_model_weights(name))
    except (ValueError, KeyError):
        return 1
    return max((max(w.meta.get("min_size", (1, 1))) for w in weights), default=1)


MODELS: dict[str, ModelEntry] = {
    "lenet5": ModelEntry(_lenet5, "classify", 28),
    "resnet18": ModelEntry(_resnet(18), "classify", None),
    "resnet34": ModelEntry(_resnet(34), "classify", None),
    "resnet50": ModelEntry(_resnet(50), "classify", None),
    "mobilenet_v3_small": ModelEntry(_mobilenet_v3_small, "classify", None),
    "kiln-det-s": ModelEntry(_detector("s"), "detect", 128),
    "kiln-det-m": ModelEntry(_detector("m"), "detect", 320),
    **{f"kiln-det-{b}": ModelEntry(_detector(b), "detect", 320) for b in TV_BACKBONES},
}


def model_entry(name: str) -> ModelEntry:
    """kiln's entry for ``name``, else a torchvision classifier of that name, else ``timm:NAME``."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith("timm:"):
        timm_name(name)  # unknown names fail here, with the nearest ones
        return ModelEntry(_timm(name), "classify", 224)
    tv = torchvision_classifiers()
    if name in tv:
        return ModelEntry(_torchvision(name), "classify", 224, _torchvision_min_size(name))
    raise unknown_model(name, list(dict.fromkeys([*MODELS, *tv])))  # resnet18 etc. are in both


def unknown_model(name: str, known: list[str]) -> ConfigError:
    """One line with the nearest names (the full list of torchvision models is too long to print)."""
    import difflib

    near = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
    hint = f" Did you mean '{near[0]}'? Nearest: {', '.join(near)}." if near else ""
    return ConfigError(f"--model: unknown model '{name}'.{hint} Known: {', '.join(MODELS)}, any torchvision "
                       "classifier (torchvision.models.list_models()) or timm:NAME")


def model_cost(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """Parameter count and GFLOPs of one forward pass on an input of ``input_shape`` ``[C, H, W]``.

    GFLOPs count a multiply-add once, as torchvision's and timm's model tables do (resnet18 at 224:
    1.8), measured with ``torch.utils.flop_counter.FlopCounterMode`` over one batch-1 pass in eval mode
    (BatchNorm statistics are left alone); the model's train/eval mode is restored afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return {"parameters": int(params), "gflops": round(counter.get_total_flops() / 2 / 1e9, 4)}


def build_model(arch: Architecture) -> nn.Module:
    """Build the (untrained) module that ``arch`` describes."""
    return model_entry(arch.name).build(**arch.args)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict with ``weights_only=True``; accepts a bare state dict (a torchvision or timm
    download as it is), a kiln checkpoint, or a ``.safetensors`` file (Hugging Face / timm)."""
    if str(path).endswith(".safetensors"):
        obj: Any = _read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"weights file not found: {path}") from None
        except Exception as exc:
            raise CheckpointError(
                f"cannot read weights {path}: not a valid PyTorch file "
                f"({type(exc).__name__}: {exc})") from None
    for key in ("model", "state_dict"):  # kiln checkpoints; timm training checkpoints
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def _read_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(f"cannot read weights {path}: not a valid safetensors file ({exc})") from None


def _is_head_change(own: torch.Size, got: torch.Size) -> bool:
    """A class-count change alters only the output dimension (dim 0) of the head's weight and bias;
    any other shape difference means the weights come from another architecture."""
    return len(own) == len(got) and own[1:] == got[1:] and own[:1] != got[:1]


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, replace_head: bool = False,
                 ignore: tuple[str, ...] = ()) -> list[str]:
    """Copy ``state`` into ``model``. With ``replace_head``, tensors whose output dimension differs
    (the classifier for another class count) are skipped and keep their fresh initialization; returns
    the names that were skipped. ``ignore``: key prefixes to leave out of the copy (auxiliary heads in the
    file; a head the model keeps freshly initialized).

    Anything else that does not fit (another architecture's checkpoint) raises one line naming the
    first key that does not match.
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (ignore and k.startswith(ignore))}
    skipped: list[str] = []
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            if not (replace_head and _is_head_change(own[k].shape, v.shape)):
                raise CheckpointError(f"weights do not fit the model: {k} has shape {tuple(v.shape)}, "
                                      f"expected {tuple(own[k].shape)}"
                                      + ("" if replace_head else " (a different class count? fine-tune with "
                                                                 "--weights in kiln train)"))
            skipped.append(k)
    filtered = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    missing = [m for m in missing if m not in skipped and not m.endswith("num_batches_tracked")
               and not (ignore and m.startswith(ignore))]
    if unexpected:
        raise CheckpointError(f"weights do not fit the model: the file has {unexpected[0]}, which the model "
                              f"does not (and {len(unexpected) - 1} more); a "
                              "checkpoint of another architecture?")
    if missing:
        raise CheckpointError(f"weights do not fit the model: {missing[0]} is missing from the file "
                              f"(and {len(missing) - 1} more); a checkpoint of another architecture?")
    return skipped


def load_pretrained(model: nn.Module, arch: Architecture, which: str | bool) -> tuple[Preprocess, list[str]]:
    """Load the pretrained weights ``which`` (``True``: the recommended ones) of ``arch`` into ``model``,
    replacing the classifier head when the class count differs; a kiln-det-<backbone> detector loads
    them into its backbone. Returns the weights' preprocessing and the head tensors left fresh."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, TorchvisionBackbone):
        state, pre = pretrained_state(backbone.arch, which)
        load_classifier_weights(backbone, state)
        return pre, []
    name = arch.name
    if name in MODELS and (MODELS[name].task != "classify" or name == "lenet5"):
        raise ConfigError(f"--pretrained: {name} has no pretrained weights; they exist for {WEIGHTS_HINT}")
    state, pre = pretrained_state(name, which)
    aux = ("AuxLogits.", "aux1.", "aux2.")  # train-time auxiliary heads kiln leaves out
    return pre, load_weights(model, state, replace_head=True, ignore=aux)


def load_model(bundle: Bundle | str | os.PathLike[str], *, file: str = "model.pt") -> nn.Module:
    """Rebuild the bundle's architecture, load ``model.pt`` and return it in eval mode on the CPU."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    path = b.path(file)
    if not path.is_file():
        raise ConfigError(f"{b.root} has no {file}: train first (kiln train --out {b.root})")
    model = build_model(b.manifest.architecture)
    load_weights(model, read_state_dict(path))
    return model.eval()
