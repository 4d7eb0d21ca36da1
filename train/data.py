"""Datasets, chosen by ``--data``: a spec string ``NAME`` or ``NAME:ARG[:ARG]``.

Every dataset opens as an :class:`ImageDataset`: raw images (PIL, 8-bit L or RGB) and targets (an int
label for classification; ``{"boxes": float32[K, 4] xyxy pixels, "labels": int64[K]}`` for detection).
Training wraps it with augmentation; eval, export, calibration and serving go through
:mod:`kiln.processing`, so every stage preprocesses identically. Nothing is downloaded: a missing file
is a :class:`~kiln.errors.DatasetError` that says which file was expected where.
"""

from __future__ import annotations

import gzip
import logging
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from kiln.errors import DatasetError, unknown_choice
from kiln.processing import ImageDecodeError, load_image

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageDataset:
    """One split of a dataset. ``images`` is a uint8 array ``[N, H, W]`` / ``[N, H, W, 3]`` or a list of paths."""

    name: str
    split: Split
    task: Literal["classify", "detect"]
    classes: list[str]
    channels: Literal["L", "RGB"]
    images: np.ndarray | Sequence[Path]
    targets: list[Any]
    native_size: tuple[int, int] | None = None  # (H, W) when every image has the same size
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Image.Image:
        if isinstance(self.images, np.ndarray):
            arr = self.images[i]
            return Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")
        return load_image(str(self.images[i])).convert(self.channels)

    def target(self, i: int) -> Any:
        return self.targets[i]

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        idx = list(indices)
        images: np.ndarray | list[Path]
        if isinstance(self.images, np.ndarray):
            images = self.images[np.asarray(idx, dtype=np.int64)]
        else:
            images = [self.images[i] for i in idx]
        return ImageDataset(
            self.name, self.split, self.task, self.classes, self.channels, images,
            [self.targets[i] for i in idx], self.native_size, dict(self.info),
        )


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


def dataset_task(data: str) -> Literal["classify", "detect"]:
    return OPENERS[DataSpec.parse(data).name].task


def split_indices(n: int, val_fraction: float, seed: int, labels: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """A fixed, seeded split; stratified by label when labels are given."""
    if not 0 < val_fraction < 1:
        raise DatasetError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    if labels is None:
        groups = [np.arange(n)]
    else:
        lab = np.asarray(labels)
        groups = [np.flatnonzero(lab == c) for c in np.unique(lab)]
    for g in groups:
        g = rng.permutation(g)
        k = max(1, round(len(g) * val_fraction)) if len(g) > 1 else 0
        val.extend(int(i) for i in g[:k])
        train.extend(int(i) for i in g[k:])
    if not train or not val:
        raise DatasetError(f"dataset of {n} images is too small to split with --val-fraction {val_fraction}")
    return sorted(train), sorted(val)


# ---- classification datasets -----------------------------------------------------------------------


def _digits(*, val_fraction: float, seed: int, **_: Any) -> tuple[ImageDataset, ImageDataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)  # [1797, 8, 8], 0..16
    labels = [int(t) for t in bunch.target]
    full = ImageDataset("digits", "train", "classify", [str(i) for i in range(10)], "L", images, labels, (8, 8))
    tr, va = split_indices(len(labels), val_fraction, seed, labels)
    train, val = full.subset(tr), full.subset(va)
    val.split = "val"
    return train, val


def _find(root: Path, names: Sequence[str], what: str) -> Path:
    for n in names:
        if (root / n).is_file():
            return root / n
    raise DatasetError(f"{what}: expected {' or '.join(str(root / n) for n in names)} (no download is attempted)")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or raw."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset != count:
        raise DatasetError(f"{path}: header says {dims} ({count} bytes) but {len(raw) - offset} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _mnist(root: str, **_: Any) -> tuple[ImageDataset, ImageDataset]:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetError(f"mnist: folder {base} does not exist")
    if (base / "raw").is_dir() and not any(base.glob("train-images*")):
        base = base / "raw"  # torchvision's MNIST/raw layout
    splits = []
    for split, prefix in (("train", "train"), ("val", "t10k")):
        img = read_idx(_find(base, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-images.idx3-ubyte"], "mnist"))
        lab = read_idx(_find(base, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz", f"{prefix}-labels.idx1-ubyte"], "mnist"))
        if img.ndim != 3 or lab.ndim != 1 or len(img) != len(lab):
            raise DatasetError(f"mnist {split}: {len(img)} images but {len(lab)} labels in {base}")
        splits.append(
            ImageDataset("mnist", split, "classify", [str(i) for i in range(10)], "L", np.ascontiguousarray(img),  # type: ignore[arg-type]
                         [int(x) for x in lab], (img.shape[1], img.shape[2]))
        )
    return splits[0], splits[1]


def _cifar10(root: str, **_: Any) -> tuple[ImageDataset, ImageDataset]:
    base = Path(root).expanduser()
    if (base / "cifar-10-batches-py").is_dir():
        base = base / "cifar-10-batches-py"
    if not base.is_dir():
        raise DatasetError(f"cifar10: folder {base} does not exist")

    def load(name: str) -> dict[bytes, Any]:
        path = _find(base, [name], "cifar10")
        try:
            with open(path, "rb") as fh:
                return pickle.load(fh, encoding="bytes")  # noqa: S301 - the dataset's own format
        except Exception as exc:
            raise DatasetError(f"cannot read {path}: {exc}") from None

    meta = load("batches.meta")
    classes = [c.decode() for c in meta[b"label_names"]]
    out = []
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("val", ["test_batch"])):
        batches = [load(n) for n in names]
        data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = [int(x) for b in batches for x in b[b"labels"]]
        out.append(ImageDataset("cifar10", split, "classify", classes, "RGB", np.ascontiguousarray(data), labels, (32, 32)))  # type: ignore[arg-type]
    return out[0], out[1]


def _scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[Path], list[int]]:
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    if not classes:
        raise DatasetError(f"folder: {root} has no class sub-folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for idx, name in enumerate(classes):
        cdir = root / name
        if not cdir.is_dir():
            continue
        for p in sorted(cdir.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS:
                paths.append(p)
                labels.append(idx)
    if not paths:
        raise DatasetError(f"folder: no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
    return classes, paths, labels


def check_images(paths: Sequence[Path], skip_bad: bool) -> list[int]:
    """Decode every image once before training; return the indices of the good ones.

    A bad image stops everything with its path unless ``skip_bad`` is set, then they are counted.
    """
    good, bad = [], []
    for i, p in enumerate(paths):
        try:
            load_image(str(p))
        except (ImageDecodeError, OSError) as exc:
            bad.append((p, exc))
            continue
        good.append(i)
    if bad and not skip_bad:
        first = "; ".join(f"{p}: {e}" for p, e in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DatasetError(f"{len(bad)} unreadable image(s): {first}{more}. Fix them or pass --skip-bad-images")
    if bad:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), bad[0][0])
    return good


def _folder(root: str, *, val_fraction: float, seed: int, skip_bad_images: bool, **_: Any) -> tuple[ImageDataset, ImageDataset]:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetError(f"folder: {base} does not exist")

    def make(split: Split, paths: list[Path], labels: list[int], classes: list[str]) -> ImageDataset:
        ok = check_images(paths, skip_bad_images)
        return ImageDataset("folder", split, "classify", classes, _folder_channels(paths, ok), [paths[i] for i in ok],
                            [labels[i] for i in ok], None, {"root": str(base)})

    if (base / "train").is_dir() and (base / "val").is_dir():
        names, tp, tl = _scan_folder(base / "train")
        vp, vl = _scan_folder(base / "val", names)[1:]
        return make("train", tp, tl, names), make("val", vp, vl, names)
    classes, paths, labels = _scan_folder(base)
    tr, va = split_indices(len(paths), val_fraction, seed, labels)
    return (make("train", [paths[i] for i in tr], [labels[i] for i in tr], classes),
            make("val", [paths[i] for i in va], [labels[i] for i in va], classes))


def _folder_channels(paths: list[Path], ok: list[int]) -> Literal["L", "RGB"]:
    """Grayscale only when every sampled image is single-channel."""
    for i in ok[:32]:
        with Image.open(paths[i]) as im:
            if im.mode not in ("L", "1", "I;16", "I", "LA"):
                return "RGB"
    return "L" if ok else "RGB"


def _detection_opener(name: str) -> Callable[..., tuple[ImageDataset, ImageDataset]]:
    def fn(*args: str, **kw: Any) -> tuple[ImageDataset, ImageDataset]:
        from kiln.train.detect import data as det

        return getattr(det, f"open_{name}")(*args, **kw)

    return fn


OPENERS: dict[str, Opener] = {
    "digits": Opener(_digits, 0, "digits", "classify"),
    "mnist": Opener(_mnist, 1, "mnist:DIR (the IDX files as distributed)", "classify"),
    "cifar10": Opener(_cifar10, 1, "cifar10:DIR (the python pickle batches)", "classify"),
    "folder": Opener(_folder, 1, "folder:DIR (DIR/<class>/*.png, or DIR/train and DIR/val)", "classify"),
    "shapes": Opener(_detection_opener("shapes"), 0, "shapes", "detect"),
    "coco": Opener(_detection_opener("coco"), 2, "coco:ANNOTATIONS.json:IMAGES_DIR", "detect"),
    "yolo": Opener(_detection_opener("yolo"), 1, "yolo:DATA.yaml", "detect"),
}
