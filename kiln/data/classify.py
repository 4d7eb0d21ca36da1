"""Classification datasets: scikit-learn's ``digits``, MNIST IDX files, CIFAR-10 pickle batches and a
folder per class.

Every opener returns ``(train, val)`` :class:`~kiln.data.dataset.ImageDataset` objects with
``task="classify"`` and an int label per image.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.bundle import Preprocess
from kiln.data.dataset import (
    IMG_EXTENSIONS,
    ImageDataset,
    Split,
    decode_images,
    split_indices,
    training_decode,
)
from kiln.errors import DatasetError


def open_digits(*, val_fraction: float, seed: int, **_: Any) -> tuple[ImageDataset, ImageDataset]:
    # scikit-learn ships with the train extra only; a serving image reads no dataset
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)  # [1797, 8, 8], 0..16
    labels = [int(t) for t in bunch.target]
    full = ImageDataset("digits", "train", "classify", [str(i) for i in range(10)], "L", images, labels,
                        (8, 8))
    tr, va = split_indices(len(labels), val_fraction, seed, labels)
    train, val = full.subset(tr), full.subset(va)
    val.split = "val"
    return train, val


def _find(root: Path, names: Sequence[str], what: str) -> Path:
    for n in names:
        if (root / n).is_file():
            return root / n
    raise DatasetError(
        f"{what}: expected {' or '.join(str(root / n) for n in names)} (no download is attempted)")


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


def open_mnist(root: str, **_: Any) -> tuple[ImageDataset, ImageDataset]:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetError(f"mnist: folder {base} does not exist")
    if (base / "raw").is_dir() and not any(base.glob("train-images*")):
        base = base / "raw"  # torchvision's MNIST/raw layout
    splits = []
    for split, prefix in (("train", "train"), ("val", "t10k")):
        img = read_idx(
            _find(base,
                  [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz",
                   f"{prefix}-images.idx3-ubyte"], "mnist"))
        lab = read_idx(
            _find(base,
                  [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz",
                   f"{prefix}-labels.idx1-ubyte"], "mnist"))
        if img.ndim != 3 or lab.ndim != 1 or len(img) != len(lab):
            raise DatasetError(f"mnist {split}: {len(img)} images but {len(lab)} labels in {base}")
        splits.append(
            ImageDataset("mnist", split, "classify",  # type: ignore[arg-type]
                         [str(i) for i in range(10)], "L", np.ascontiguousarray(img),
                         [int(x) for x in lab], (img.shape[1], img.shape[2]))
        )
    return splits[0], splits[1]


def open_cifar10(root: str, **_: Any) -> tuple[ImageDataset, ImageDataset]:
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
        out.append(
            ImageDataset("cifar10", split, "classify", classes,  # type: ignore[arg-type]
                         "RGB", np.ascontiguousarray(data), labels, (32, 32)))
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


def open_folder(root: str, *, val_fraction: float, seed: int, skip_bad_images: bool,
                **_: Any) -> tuple[ImageDataset, ImageDataset]:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DatasetError(f"folder: {base} does not exist")

    def make(split: Split, paths: list[Path], labels: list[int], classes: list[str], own_val: bool,
             spec: Preprocess | None) -> ImageDataset:
        # the one decoding pass, as training decodes (small sets keep these pixels: nothing decodes
        # them again)
        seen = decode_images(paths, skip_bad_images, spec=spec)
        ok = seen.good
        return ImageDataset("folder", split, "classify", classes, "L" if seen.gray else "RGB",
                            [paths[i] for i in ok], [labels[i] for i in ok], None,
                            {"root": str(base), "own_val": own_val}, seen.sizes, seen.pixels, seen.scales)

    if (base / "train").is_dir() and (base / "val").is_dir():
        names, tp, tl = _scan_folder(base / "train")
        vp, vl = _scan_folder(base / "val", names)[1:]
        spec = training_decode(tp)
        return make("train", tp, tl, names, True, spec), make("val", vp, vl, names, True, spec)
    classes, paths, labels = _scan_folder(base)
    tr, va = split_indices(len(paths), val_fraction, seed, labels)
    spec = training_decode([paths[i] for i in tr])
    return (make("train", [paths[i] for i in tr], [labels[i] for i in tr], classes, False, spec),
            make("val", [paths[i] for i in va], [labels[i] for i in va], classes, False, spec))

