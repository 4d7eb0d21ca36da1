"""TrainConfig: every option of ``kiln train``, validated where it is built."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from kiln import vocab
from kiln.bundle import BatchRange
from kiln.data.inspect import MIN_STEPS
from kiln.errors import ConfigError, unknown_choice

# The names in kiln.models.MODELS, here so `kiln --help` does not import torch (a test keeps them equal).
# Beyond these, any torchvision classifier name and timm:NAME are accepted (checked when the model is built).
MODEL_NAMES = ("lenet5", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "kiln-det-s", "kiln-det-m",
               "kiln-det-resnet18", "kiln-det-resnet34", "kiln-det-resnet50", "kiln-det-mobilenet_v3_large",
               "kiln-det-efficientnet_b0")
# torchvision.models.list_models(module=torchvision.models), so a mistyped --model fails before torch loads
# (tests/train/test_models.py keeps it equal to the installed torchvision's list).
TORCHVISION_CLASSIFIERS = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121",
    "densenet161", "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1",
    "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6",
    "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2",
    "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf",
    "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf", "regnet_y_128gf",
    "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf",
    "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1",
    "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn", "vgg13",
    "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14",
    "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2",
)
OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
AMP_MODES = ("auto", "off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("auto", *vocab.TASKS)

# Learning rates that work out of the box for each optimizer (used when --lr is not given).
DEFAULT_LR = {"sgd": 0.05, "momentum": 0.05, "adagrad": 0.01, "adam": 2e-3, "adamw": 2e-3}
# The batch size of each task when the training set gives enough steps per epoch at it (see
# default_batch_size).
DEFAULT_BATCH = {"classify": 64, "detect": 16}
MIN_STEPS_PER_EPOCH = MIN_STEPS  # the same bar as the steps-per-epoch warning of kiln data inspect
MIN_AUTO_BATCH = 8
# default warm-up: this share of the run's steps (at least MIN_WARMUP_STEPS), at most one epoch
WARMUP_SHARE = 0.05
MIN_WARMUP_STEPS = 20
PRECISE_BN_IMAGES = 512


def check_model_name(name: str) -> None:
    """Raise the one-line error for a ``--model`` that names nothing kiln can build (no torch needed)."""
    if name in MODEL_NAMES or name in TORCHVISION_CLASSIFIERS or name.startswith("timm:"):
        return
    known = list(dict.fromkeys([*MODEL_NAMES, *TORCHVISION_CLASSIFIERS]))
    near = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
    hint = f" Did you mean '{near[0]}'? Nearest: {', '.join(near)}." if near else ""
    raise ConfigError(f"--model: unknown model '{name}'.{hint} Known: {', '.join(MODEL_NAMES)}, any "
                      "torchvision classifier (torchvision.models.list_models()) or timm:NAME")


def default_batch_size(task: str, train_images: int, world: int = 1) -> int:
    """The task's batch size, halved (down to 8) until an epoch has at least 10 optimizer steps: a small
    set at batch 64 takes 3 steps an epoch, too few for the weights or BatchNorm statistics to settle."""
    batch = DEFAULT_BATCH[task]
    while batch > MIN_AUTO_BATCH and train_images // (batch * world) < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch


def default_warmup_epochs(epochs: int, steps_per_epoch: int) -> float:
    """Warm-up scaled to the run: 5% of its steps but at least 20 steps, never more than one epoch (a
    2-epoch run does not spend half of it warming up; a 3-step epoch still warms up over a whole one)."""
    steps = max(WARMUP_SHARE * epochs * steps_per_epoch, MIN_WARMUP_STEPS)
    return min(1.0, steps / max(1, steps_per_epoch))


def warmup_epochs(cfg: TrainConfig, steps_per_epoch: int) -> float:
    """``cfg``'s warm-up in epochs: ``--warmup-epochs``, else :func:`default_warmup_epochs`."""
    if cfg.warmup_epochs is not None:
        return cfg.warmup_epochs
    return default_warmup_epochs(cfg.epochs, steps_per_epoch)


@dataclass
class TrainConfig:
    data: str = "digits"
    model: str | None = None  # None: lenet5 for classification, kiln-det-s for detection
    task: str = "auto"
    epochs: int = 20
    batch_size: int | None = None  # None: default_batch_size() of the task and the training set
    lr: float | None = None
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_epochs: float | None = None  # None: default_warmup_epochs(epochs)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    workers: int | None = None  # None: 0 for images held in memory, else up to 4 (one core left to training)
    image_size: int | None = None
    val_fraction: float = 0.2
    skip_bad_images: bool = False
    weights: str | None = None
    pretrained: str | None = None  # "DEFAULT" or a weights name (IMAGENET1K_V2); None: random init
    freeze_backbone: int = 0  # epochs trained with the backbone frozen (the new head only), then unfrozen
    backbone_lr_scale: float = 1.0  # the backbone's learning rate relative to --lr
    batch_range: str = "1:8:32"
    precise_bn: bool = True  # re-estimate BatchNorm statistics before each validation (and so in the bundle)
    # training images (no augmentation) the statistics are taken over
    precise_bn_images: int = PRECISE_BN_IMAGES
    out: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific (e.g. detection loss weights)

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("--optimizer", self.optimizer, OPTIMIZERS),
            ("--schedule", self.schedule, SCHEDULES),
            ("--amp", self.amp, AMP_MODES),
            ("--device", self.device, DEVICES),
            ("--task", self.task, TASKS),
        ):
            if value not in valid:
                raise unknown_choice(name.removeprefix("--"), value, valid, flag=name)
        checks: list[tuple[str, bool, object]] = [
            ("--epochs", self.epochs >= 1, self.epochs),
            ("--batch-size", self.batch_size is None or self.batch_size >= 1, self.batch_size),
            ("--lr", self.lr is None or self.lr > 0, self.lr),
            ("--warmup-epochs", self.warmup_epochs is None or self.warmup_epochs >= 0, self.warmup_epochs),
            ("--precise-bn-images", self.precise_bn_images >= 1, self.precise_bn_images),
            ("--weight-decay", self.weight_decay >= 0, self.weight_decay),
            ("--label-smoothing", 0 <= self.label_smoothing < 1, self.label_smoothing),
            ("--grad-clip", self.grad_clip is None or self.grad_clip > 0, self.grad_clip),
            ("--val-fraction", 0 < self.val_fraction < 1, self.val_fraction),
            ("--image-size", self.image_size is None or self.image_size >= 8, self.image_size),
            ("--workers", self.workers is None or self.workers >= 0, self.workers),
            ("--freeze-backbone", self.freeze_backbone >= 0, self.freeze_backbone),
            ("--backbone-lr-scale", 0 < self.backbone_lr_scale <= 1, self.backbone_lr_scale),
        ]
        try:
            BatchRange.parse(self.batch_range)
        except ValueError as exc:
            raise ConfigError(f"--batch-range: {exc}") from None
        for flag, ok, got in checks:
            if not ok:
                raise ConfigError(f"{flag}: invalid value {got}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
