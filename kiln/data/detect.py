"""Detection datasets: the synthetic ``shapes`` set, COCO instances JSON and the Ultralytics YOLO layout.

Every opener returns ``(train, val)`` :class:`~kiln.data.dataset.ImageDataset` objects with
``task="detect"`` and targets ``{"boxes": float32[K, 4] xyxy in original pixels, "labels": int64[K]}``.
``K`` may be 0: an image without objects is a valid negative sample.

Bad annotations are handled the same way for every format (:func:`sanitize_boxes`): boxes reaching
outside the image are clipped to it, boxes that are degenerate after clipping (under one pixel wide or
high) are dropped and counted in the log; class ids out of range and annotations that name images which
do not exist stop with a :class:`~kiln.errors.DatasetError` listing the first offenders.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from kiln.data.dataset import IMG_EXTENSIONS, ImageDataset, Split, check_images, split_indices
from kiln.errors import DatasetError
from kiln.fsutil import atomic_path, atomic_write_json, atomic_write_text
from kiln.processing import displayed_size

log = logging.getLogger(__name__)

SHAPES_CLASSES = ["circle", "square", "triangle"]
SHAPES_COUNT = 1000  # images in the default set (train + val); sized for a CPU training run of minutes
SHAPES_SIZE = (120, 160)  # (H, W): not square, so the letterbox pads and scales
SHAPES_DATA_SEED = 0  # the content is fixed; the --seed of a run only changes the train/val split
MIN_BOX_SIDE = 1.0  # pixels: narrower boxes (after clipping) are degenerate
SHOW = 5  # offenders named in an error


# ---- shared checks ---------------------------------------------------------------------------------


def sanitize_boxes(boxes: np.ndarray, labels: np.ndarray, width: int,
                   height: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Clip ``boxes [K, 4]`` (xyxy pixels) to the image and drop degenerate ones.

    Returns ``(boxes, labels, clipped, dropped)``: how many kept boxes were changed by clipping and how
    many were removed because they are under :data:`MIN_BOX_SIDE` pixels wide or high afterwards.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    clipped_boxes = boxes.copy()
    clipped_boxes[:, [0, 2]] = clipped_boxes[:, [0, 2]].clip(0, width)
    clipped_boxes[:, [1, 3]] = clipped_boxes[:, [1, 3]].clip(0, height)
    keep = ((clipped_boxes[:, 2] - clipped_boxes[:, 0]) >= MIN_BOX_SIDE) & (
        (clipped_boxes[:, 3] - clipped_boxes[:, 1]) >= MIN_BOX_SIDE)
    clipped = int(((np.abs(clipped_boxes - boxes) > 1e-6).any(1) & keep).sum())
    return clipped_boxes[keep], labels[keep], clipped, int((~keep).sum())


def _offenders(kind: str, items: Sequence[str], hint: str) -> DatasetError:
    more = f" (and {len(items) - SHOW} more)" if len(items) > SHOW else ""
    return DatasetError(f"{len(items)} {kind}: {'; '.join(items[:SHOW])}{more}. {hint}")


def _log_box_fixes(name: str, clipped: int, dropped: int) -> None:
    if clipped:
        log.info("%s: clipped %d box(es) that reached outside their image", name, clipped)
    if dropped:
        log.warning("%s: dropped %d degenerate box(es) (under %.0f px wide or high after clipping)", name,
                    dropped, MIN_BOX_SIDE)


def _target(boxes: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64).reshape(-1)}


# ---- shapes --------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured noise: a random low-frequency colour field plus fine grain, uint8 ``[H, W, 3]``."""
    cells = int(rng.integers(3, 9))
    coarse = rng.uniform(40, 215, size=(cells, cells, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC),
                       dtype=np.float32)
    grain = rng.normal(0, rng.uniform(4, 20), size=(h, w, 1)).astype(np.float32)
    return np.clip(field + grain, 0, 255).astype(np.uint8)


def _iou_any(box: np.ndarray, others: list[np.ndarray], limit: float) -> bool:
    for o in others:
        ix = max(0.0, min(box[2], o[2]) - max(box[0], o[0]))
        iy = max(0.0, min(box[3], o[3]) - max(box[1], o[1]))
        inter = ix * iy
        small = min((box[2] - box[0]) * (box[3] - box[1]), (o[2] - o[0]) * (o[3] - o[1]))
        if inter > limit * small:
            return True
    return False


def shapes_image(rng: np.random.Generator,
                 size: tuple[int, int] = SHAPES_SIZE) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One synthetic image (uint8 ``[H, W, 3]``) with 1-6 shapes and their exact boxes."""
    h, w = size
    img = Image.fromarray(_background(rng, h, w), "RGB")
    draw = ImageDraw.Draw(img)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(20):
            side = int(rng.integers(16, 65))
            x0 = int(rng.integers(0, w - side + 1))
            y0 = int(rng.integers(0, h - side + 1))
            # PIL fills pixels x0..x1 inclusive, so the object covers [x0, x1 + 1) in continuous coordinates
            x1, y1 = x0 + side - 1, y0 + side - 1
            box = np.array([x0, y0, x1 + 1, y1 + 1], dtype=np.float32)
            if not _iou_any(box, boxes, 0.15):
                break
        else:
            continue
        cls = int(rng.integers(0, len(SHAPES_CLASSES)))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if cls == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif cls == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            apex = int(rng.integers(x0, x1 + 1))  # a varied triangle that still touches all four box sides
            up = rng.random() < 0.5
            pts = [(apex, y0), (x0, y1), (x1, y1)] if up else [(apex, y1), (x0, y0), (x1, y0)]
            draw.polygon(pts, fill=colour)
        boxes.append(box)
        labels.append(cls)
    return np.asarray(img), _target(np.stack(boxes) if boxes else np.zeros((0, 4)), np.asarray(labels))


def make_shapes(count: int = SHAPES_COUNT,
                seed: int = SHAPES_DATA_SEED) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """``count`` images ``[N, H, W, 3]`` and targets; the same ``(count, seed)`` gives identical data."""
    if count < 2:
        raise DatasetError(f"shapes: need at least 2 images, got {count}")
    rng = np.random.default_rng(seed)
    images = np.empty((count, *SHAPES_SIZE, 3), dtype=np.uint8)
    targets = []
    for i in range(count):
        images[i], t = shapes_image(rng)
        targets.append(t)
    return images, targets


def shapes_count() -> int:
    """The default set size; ``KILN_SHAPES_COUNT`` overrides it (quick experiments and tests)."""
    raw = os.environ.get("KILN_SHAPES_COUNT")
    if not raw:
        return SHAPES_COUNT
    try:
        n = int(raw)
    except ValueError:
        raise DatasetError(f"KILN_SHAPES_COUNT must be an integer, got '{raw}'") from None
    if n < 2:
        raise DatasetError(f"KILN_SHAPES_COUNT must be >= 2, got {n}")
    return n


def open_shapes(*, val_fraction: float = 0.2, seed: int = 0, skip_bad_images: bool = False,
                **_: Any) -> tuple[ImageDataset, ImageDataset]:
    """The synthetic shapes set, in memory; ``seed`` picks the train/val split, not the content."""
    count = shapes_count()
    images, targets = make_shapes(count)
    full = ImageDataset("shapes", "train", "detect", list(SHAPES_CLASSES), "RGB", images, targets,
                        SHAPES_SIZE, {"count": count, "data_seed": SHAPES_DATA_SEED})
    tr, va = split_indices(count, val_fraction, seed)
    train, val = full.subset(tr), full.subset(va)
    val.split = "val"
    return train, val


def _save_png(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr, "RGB").save(tmp, format="PNG")


def _split_of(count: int, seed: int) -> dict[str, list[int]]:
    tr, va = split_indices(count, 0.2, seed)
    return {"train": tr, "val": va}


def write_shapes_coco(out: str | os.PathLike[str], count: int | None = None, seed: int = 0) -> Path:
    """Write shapes in the COCO layout and return ``out``.

    ``out/images/{train,val}/*.png`` and ``out/annotations/instances_{train,val}.json``; load it back
    with ``--data coco:OUT/annotations/instances_train.json:OUT/images/train`` (the val file and folder
    beside them are found by name). ``seed`` changes the content; the split is 80/20.
    """
    root = Path(out)
    n = count or shapes_count()
    images, targets = make_shapes(n, seed)
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES_CLASSES)]
    for split, idx in _split_of(n, seed).items():
        img_dir = root / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        entries: list[dict[str, Any]] = []
        anns: list[dict[str, Any]] = []
        for i in idx:
            name = f"{i:06d}.png"
            _save_png(img_dir / name, images[i])
            h, w = images[i].shape[:2]
            entries.append({"id": i + 1, "file_name": name, "width": w, "height": h})
            for box, label in zip(targets[i]["boxes"], targets[i]["labels"], strict=True):
                x1, y1, x2, y2 = (float(v) for v in box)
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        atomic_write_json(root / "annotations" / f"instances_{split}.json",
                          {"info": {"description": f"kiln synthetic shapes (seed {seed})"}, "images": entries,
                           "annotations": anns, "categories": categories})
    return root


def write_shapes_yolo(out: str | os.PathLike[str], count: int | None = None, seed: int = 0) -> Path:
    """Write shapes in the Ultralytics layout; returns the path of ``data.yaml`` (for ``--data yolo:...``
    and for Ultralytics as written: its ``path`` is the folder's absolute path)."""
    root = Path(out)
    n = count or shapes_count()
    images, targets = make_shapes(n, seed)
    for split, idx in _split_of(n, seed).items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in idx:
            _save_png(root / "images" / split / f"{i:06d}.png", images[i])
            h, w = images[i].shape[:2]
            lines = []
            for (x1, y1, x2, y2), label in zip(targets[i]["boxes"], targets[i]["labels"], strict=True):
                lines.append(f"{int(label)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                             f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
            atomic_write_text(root / "labels" / split / f"{i:06d}.txt", "".join(f"{ln}\n" for ln in lines))
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(SHAPES_CLASSES))
    path = root / "data.yaml"
    # An absolute path: Ultralytics resolves a relative one against its own datasets folder (or the current
    # directory), not against this file, so `path: .` loads only when run from this folder.
    atomic_write_text(path, f"path: {json.dumps(str(root.resolve()))}\n"
                      f"train: images/train\nval: images/val\nnames:\n{names}")
    return path


# ---- COCO ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"coco: annotation file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"coco: cannot read {path}: {exc}") from None


def _coco_split(ann_path: Path, images_dir: Path, split: Split, skip_bad_images: bool,
                classes: list[str] | None = None) -> ImageDataset:
    data = _read_json(ann_path)
    if (not isinstance(data, dict) or not isinstance(data.get("images"), list)
            or not isinstance(data.get("categories"), list)):
        raise DatasetError(
            f"coco: {ann_path} is not a COCO instances file (needs 'images' and 'categories' lists)")
    try:
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        cat_ids = [int(c["id"]) for c in cats]
        names = [str(c["name"]) for c in cats]
        entries = {int(im["id"]): im for im in data["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"coco: {ann_path}: malformed category or image entry ({exc!r})") from None
    if classes is not None and names != classes:
        raise DatasetError(
            f"coco: {ann_path} has categories {names[:6]} but the train split has {classes[:6]}")
    index_of = {cid: i for i, cid in enumerate(cat_ids)}

    missing_files = [str(images_dir / str(im.get("file_name"))) for im in entries.values()
                     if not (images_dir / str(im.get("file_name"))).is_file()]
    if missing_files:
        raise _offenders(f"image(s) listed in {ann_path} do not exist", missing_files,
                         f"Check the IMAGES_DIR part of --data coco:{ann_path}:{images_dir}")
    per_image: dict[int, tuple[list[list[float]], list[int]]] = {i: ([], []) for i in entries}
    bad_image, bad_class, crowd = [], [], 0
    for a in data.get("annotations", []):
        try:
            image_id, cat, bbox = int(a["image_id"]), int(a["category_id"]), [float(v) for v in a["bbox"]]
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"coco: {ann_path}: malformed annotation {str(a)[:120]}") from None
        if image_id not in entries:
            bad_image.append(f"annotation {a.get('id')} -> image_id {image_id}")
            continue
        if cat not in index_of:
            bad_class.append(f"annotation {a.get('id')} -> category_id {cat}")
            continue
        if a.get("iscrowd"):
            crowd += 1  # crowd regions are not objects to detect
            continue
        if len(bbox) != 4:
            raise DatasetError(
                f"coco: {ann_path}: annotation {a.get('id')} has bbox {bbox}, expected [x, y, w, h]")
        x, y, w, h = bbox
        per_image[image_id][0].append([x, y, x + w, y + h])
        per_image[image_id][1].append(index_of[cat])
    if bad_image:
        raise _offenders(f"annotation(s) in {ann_path} name images that do not exist", bad_image,
                         "Every annotation's image_id must be the id of an entry in 'images'")
    if bad_class:
        raise _offenders(f"annotation(s) in {ann_path} have a category_id out of range", bad_class,
                         f"Known category ids: {cat_ids[:20]}")
    if crowd:
        log.info("coco %s: ignored %d crowd annotation(s)", ann_path.name, crowd)

    ids = sorted(entries)
    paths = [images_dir / str(entries[i]["file_name"]) for i in ids]
    good = check_images(paths, skip_bad_images)
    targets, clipped, dropped, out_paths, image_ids = [], 0, 0, [], []
    for k in good:
        im = entries[ids[k]]
        w, h = im.get("width"), im.get("height")
        if not w or not h:
            with Image.open(paths[k]) as pil:
                w, h = displayed_size(pil)
        boxes, labels = per_image[ids[k]]
        b, lab, c, d = sanitize_boxes(np.asarray(boxes, dtype=np.float32), np.asarray(labels), int(w), int(h))
        clipped, dropped = clipped + c, dropped + d
        targets.append(_target(b, lab))
        out_paths.append(paths[k])
        image_ids.append(ids[k])
    _log_box_fixes(f"coco {ann_path.name}", clipped, dropped)
    return ImageDataset("coco", split, "detect", names, "RGB", out_paths, targets, None,
                        {"annotations": str(ann_path), "images": str(images_dir), "image_ids": image_ids,
                         "category_ids": cat_ids, "dropped_boxes": dropped, "clipped_boxes": clipped})


def _sibling(path: Path, old: str, new: str) -> Path | None:
    """``path`` with the last ``old`` in its name replaced by ``new`` (instances_train -> instances_val)."""
    name = path.name
    at = name.rfind(old)
    if at < 0:
        return None
    return path.with_name(name[:at] + new + name[at + len(old):])


def open_coco(ann: str, images_dir: str, *, val_fraction: float = 0.2, seed: int = 0,
              skip_bad_images: bool = False, **_: Any) -> tuple[ImageDataset, ImageDataset]:
    """A COCO instances file and its image folder.

    When the file's name contains ``train`` and a file with ``val`` in its place sits beside it, that is
    the val split (its images in ``IMAGES_DIR`` with ``train`` -> ``val`` in the folder name, if such a
    folder exists, else in ``IMAGES_DIR``): the COCO 2017 and ``kiln data shapes`` layouts. Otherwise
    the file is split by ``val_fraction`` and ``seed``.
    """
    ann_path, img_dir = Path(ann).expanduser(), Path(images_dir).expanduser()
    if not img_dir.is_dir():
        raise DatasetError(f"coco: image folder {img_dir} does not exist")
    train = _coco_split(ann_path, img_dir, "train", skip_bad_images)
    val_ann = _sibling(ann_path, "train", "val")
    if val_ann is not None and val_ann.is_file():
        val_dir = _sibling(img_dir, "train", "val")
        val_dir = val_dir if val_dir is not None and val_dir.is_dir() else img_dir
        log.info("coco: val split from %s (images in %s)", val_ann, val_dir)
        return train, _coco_split(val_ann, val_dir, "val", skip_bad_images, train.classes)
    return _split(train, val_fraction, seed)


def _split(full: ImageDataset, val_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    tr, va = split_indices(len(full), val_fraction, seed)
    train, val = full.subset(tr), full.subset(va)
    for part, idx in ((train, tr), (val, va)):
        if "image_ids" in full.info:
            part.info["image_ids"] = [full.info["image_ids"][i] for i in idx]
    val.split = "val"
    return train, val


# ---- YOLO (Ultralytics layout) ---------------------------------------------------------------------


def _yolo_images(entry: Any, base: Path) -> list[Path]:
    """Images of a ``train:``/``val:`` entry: a folder, a .txt list of paths, or a list of those."""
    items = entry if isinstance(entry, list) else [entry]
    out: list[Path] = []
    for item in items:
        p = Path(str(item))
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMG_EXTENSIONS))
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                if line.strip():
                    q = Path(line.strip())
                    out.append(q if q.is_absolute() else base / q)
        else:
            raise DatasetError(
                f"yolo: {p} (from the data file) is neither an image folder nor a .txt list of images")
    return out


def _label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder in the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _yolo_split(paths: list[Path], names: list[str], split: Split, skip_bad_images: bool,
                where: str) -> ImageDataset:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise _offenders(f"image(s) listed for {split} in {where} do not exist", missing,
                         "Fix the list or the paths")
    good = check_images(paths, skip_bad_images)
    # label files without an image: annotations that name images which do not exist
    label_dirs = {_label_path(p).parent for p in paths}
    known = {_label_path(p) for p in paths}
    orphans = sorted(str(q) for d in label_dirs if d.is_dir()
                     for q in d.glob("*.txt") if q not in known and q.name != "classes.txt")
    if orphans:
        raise _offenders(f"label file(s) for {split} have no image", orphans,
                         "Each labels/X.txt needs images/X.<ext> (remove the label or add the image)")
    targets, out_paths, clipped, dropped, bad_class = [], [], 0, 0, []
    for k in good:
        img = paths[k]
        with Image.open(img) as pil:
            w, h = displayed_size(pil)
        boxes, labels = [], []
        lp = _label_path(img)
        if lp.is_file():  # no label file: a negative image, as in Ultralytics
            for n, line in enumerate(lp.read_text().splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    cls = int(float(fields[0]))
                    cx, cy, bw, bh = (float(v) for v in fields[1:5])
                except ValueError:
                    raise DatasetError(f"yolo: {lp}:{n}: expected 'class cx cy w h' (normalized), "
                                       f"got '{line.strip()}'") from None
                if len(fields) != 5:
                    raise DatasetError(f"yolo: {lp}:{n}: expected 5 values 'class cx cy w h', got "
                                       f"{len(fields)} (segmentation labels are not supported)")
                if not 0 <= cls < len(names):
                    bad_class.append(f"{lp}:{n} class {cls}")
                    continue
                boxes.append([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
                labels.append(cls)
        b, lab, c, d = sanitize_boxes(np.asarray(boxes, dtype=np.float32), np.asarray(labels), w, h)
        clipped, dropped = clipped + c, dropped + d
        targets.append(_target(b, lab))
        out_paths.append(img)
    if bad_class:
        raise _offenders(f"label(s) for {split} have a class id out of range", bad_class,
                         f"Valid ids are 0..{len(names) - 1} ({', '.join(names[:10])})")
    _log_box_fixes(f"yolo {split}", clipped, dropped)
    return ImageDataset("yolo", split, "detect", names, "RGB", out_paths, targets, None,
                        {"data": where, "dropped_boxes": dropped, "clipped_boxes": clipped})


def _yolo_names(raw: Any, where: str) -> list[str]:
    if isinstance(raw, dict):
        try:
            ids = sorted(int(k) for k in raw)
        except ValueError:
            raise DatasetError(f"yolo: {where}: 'names' keys must be class ids 0..N-1") from None
        if ids != list(range(len(ids))):
            raise DatasetError(
                f"yolo: {where}: 'names' ids must be 0..{len(ids) - 1} without gaps, got {ids[:10]}")
        return [str(raw[k] if k in raw else raw[str(k)]) for k in ids]
    if isinstance(raw, list) and raw:
        return [str(n) for n in raw]
    raise DatasetError(f"yolo: {where} needs 'names' (a list, or a mapping of class id to name)")


def open_yolo(data_yaml: str, *, val_fraction: float = 0.2, seed: int = 0, skip_bad_images: bool = False,
              **_: Any) -> tuple[ImageDataset, ImageDataset]:
    """An Ultralytics data file: ``path`` (optional), ``train``, ``val`` (optional), ``names``."""
    import yaml

    path = Path(data_yaml).expanduser()
    if not path.is_file():
        raise DatasetError(f"yolo: data file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"yolo: cannot read {path}: {exc}") from None
    if not isinstance(cfg, dict) or "train" not in cfg:
        raise DatasetError(f"yolo: {path} needs at least 'train' and 'names' keys")
    names = _yolo_names(cfg.get("names"), str(path))
    base = Path(str(cfg.get("path") or "."))
    base = base if base.is_absolute() else (path.parent / base)
    train = _yolo_split(_yolo_images(cfg["train"], base), names, "train", skip_bad_images, str(path))
    if cfg.get("val"):
        return train, _yolo_split(_yolo_images(cfg["val"], base), names, "val", skip_bad_images, str(path))
    return _split(train, val_fraction, seed)

