"""Datasets, chosen by ``--data``: a spec string ``NAME`` or ``NAME:ARG[:ARG]``.

Every dataset opens as an :class:`~kiln.data.dataset.ImageDataset` (:mod:`kiln.data.classify`,
:mod:`kiln.data.detect`). The readers need no torch: training wraps them with augmentation, while
eval, export, calibration and serving read them through :mod:`kiln.processing`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kiln.data import classify, detect, voc
from kiln.data.dataset import IMG_EXTENSIONS, ImageDataset, Split, check_images, split_indices
from kiln.errors import DatasetError, unknown_choice

__all__ = [
    "IMG_EXTENSIONS",
    "OPENERS",
    "DataSpec",
    "ImageDataset",
    "Opener",
    "Split",
    "check_images",
    "check_paths",
    "dataset_task",
    "open_dataset",
    "split_indices",
]


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value."""

    name: str
    args: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        name, _, rest = text.partition(":")
        if name not in OPENERS:
            raise unknown_choice("dataset", name, OPENERS, flag="--data")
        spec = cls(name, tuple(rest.split(":")) if rest else ())
        want = OPENERS[name].nargs
        if len(spec.args) != want:
            usage = OPENERS[name].usage
            raise DatasetError(f"--data: '{text}' is not valid; use {usage}")
        return spec

    def __str__(self) -> str:
        return ":".join((self.name, *self.args))


@dataclass(frozen=True)
class Opener:
    fn: Callable[..., tuple[ImageDataset, ImageDataset]]
    nargs: int
    usage: str
    task: Literal["classify", "detect"]


def open_dataset(
    data: str | DataSpec,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_bad_images: bool = False,
) -> tuple[ImageDataset, ImageDataset]:
    """Open the train and val splits of ``data`` (a ``--data`` string)."""
    spec = data if isinstance(data, DataSpec) else DataSpec.parse(data)
    opener = OPENERS[spec.name]
    return opener.fn(*spec.args, val_fraction=val_fraction, seed=seed, skip_bad_images=skip_bad_images)


def check_paths(data: str | DataSpec) -> None:
    """Raise the one-line :class:`DatasetError` for a ``--data`` whose folder or file does not exist,
    before anything heavy is imported or read (the readers check the contents)."""
    spec = data if isinstance(data, DataSpec) else DataSpec.parse(data)
    kinds = PATH_KINDS.get(spec.name, ())
    for kind, text in zip(kinds, spec.args, strict=False):
        path = Path(text).expanduser()
        if kind == "dir" and not path.is_dir():
            what = "is a file, not a folder" if path.is_file() else "does not exist"
            raise DatasetError(f"--data {spec}: folder {path} {what}; use {OPENERS[spec.name].usage}")
        if kind == "file" and not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise DatasetError(f"--data {spec}: file {path} {what}; use {OPENERS[spec.name].usage}")


def dataset_task(data: str) -> Literal["classify", "detect"]:
    return OPENERS[DataSpec.parse(data).name].task


OPENERS: dict[str, Opener] = {
    "digits": Opener(classify.open_digits, 0, "digits", "classify"),
    "mnist": Opener(classify.open_mnist, 1, "mnist:DIR (the IDX files as distributed)", "classify"),
    "cifar10": Opener(classify.open_cifar10, 1, "cifar10:DIR (the python pickle batches)", "classify"),
    "folder": Opener(classify.open_folder, 1, "folder:DIR (DIR/<class>/*.png, or DIR/train and DIR/val)",
                     "classify"),
    "shapes": Opener(detect.open_shapes, 0, "shapes", "detect"),
    "coco": Opener(detect.open_coco, 2, "coco:ANNOTATIONS.json:IMAGES_DIR", "detect"),
    "yolo": Opener(detect.open_yolo, 1, "yolo:DATA.yaml", "detect"),
    "voc": Opener(voc.open_voc, 1, "voc:ROOT (VOCdevkit layout: Annotations/, JPEGImages/, ImageSets/Main/)",
                  "detect"),
}

# What each argument of a dataset spec names on disk (checked by check_paths).
PATH_KINDS: dict[str, tuple[str, ...]] = {
    "mnist": ("dir",), "cifar10": ("dir",), "folder": ("dir",), "voc": ("dir",),
    "coco": ("file", "dir"), "yolo": ("file",),
}
