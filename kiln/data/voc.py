"""Pascal VOC detection datasets (``--data voc:ROOT``), the VOCdevkit layout:

    ROOT/Annotations/<id>.xml  ROOT/JPEGImages/<id>.jpg  ROOT/ImageSets/Main/{train,val,trainval}.txt

``ROOT`` may also be the ``VOCdevkit`` folder holding one ``VOC20xx`` year. Classes are the lines of
``ROOT/classes.txt`` when it exists; otherwise they are read from the annotations: VOC's 20 in their
canonical order when every object names one of them (a model keeps VOC's class indices), else the names
the files hold, sorted (exports of LabelImg, CVAT and other annotation tools carry their own classes).

Targets are those of :mod:`kiln.data.detect` plus ``iscrowd [K]``: VOC's ``difficult`` objects are kept
for training but marked so the COCO evaluation ignores them (neither a miss when not found nor a false
positive when found), which is how the VOC protocol leaves them out of mAP. Bad data is handled as for
COCO and YOLO: unknown class names and missing images stop with the offenders listed, boxes outside the
image are clipped (degenerate ones dropped and counted), an XML that does not parse names its line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kiln.data.dataset import ImageDataset, Split, check_images
from kiln.data.detect import _log_box_fixes, _offenders, _split, sanitize_boxes
from kiln.errors import DatasetError

try:  # defusedxml refuses entity-expansion bombs in untrusted annotation files
    from defusedxml.ElementTree import ParseError, parse
except ImportError:
    from xml.etree.ElementTree import ParseError, parse  # noqa: S405 - annotation files are local data

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def voc_root(root: str) -> Path:
    """The folder holding ``Annotations``: ``root`` itself, or its only ``VOC20xx`` child."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"voc: folder {path} does not exist")
    if (path / "Annotations").is_dir():
        return path
    years = sorted(p for p in path.iterdir() if p.is_dir() and (p / "Annotations").is_dir())
    if len(years) == 1:
        return years[0]
    if years:
        raise DatasetError(
            f"voc: {path} holds several datasets "
            f"({', '.join(p.name for p in years)}); name one, e.g. voc:{years[-1]}")
    raise DatasetError(
        f"voc: {path} has no Annotations folder (expected the VOCdevkit layout: "
        "Annotations/, JPEGImages/, ImageSets/Main/)")


def voc_classes(root: Path, annotations: list[dict[str, Any]] | None = None) -> list[str]:
    """``ROOT/classes.txt`` (one name a line) when it exists; otherwise the class names of ``annotations``
    (see :func:`classes_from_annotations`), or VOC's 20 when none are given."""
    custom = root / "classes.txt"
    if custom.is_file():
        names = [line.strip() for line in custom.read_text().splitlines() if line.strip()]
        if not names:
            raise DatasetError(f"voc: {custom} is empty (one class name per line)")
        return names
    if annotations is None:
        return list(VOC_CLASSES)
    return classes_from_annotations(root, annotations)


def classes_from_annotations(root: Path, annotations: list[dict[str, Any]]) -> list[str]:
    """VOC's 20 in their canonical order when every object names one of them, else the names found, sorted."""
    found = {name for a in annotations for name, _, _ in a["objects"]}
    if "" in found:
        raise DatasetError(
            f"voc: an object in {root / 'Annotations'} has no <name>; every object needs its class name")
    if not found:
        log.warning("voc: the annotations in %s hold no objects: using VOC's 20 classes (list yours in %s)",
                    root / "Annotations", root / "classes.txt")
        return list(VOC_CLASSES)
    if found <= set(VOC_CLASSES):
        log.info("voc: %d class name(s) in the annotations, all of VOC's: using VOC's 20 classes in "
                 "their order", len(found))
        return list(VOC_CLASSES)
    names = sorted(found)
    log.info("voc: no %s; %d class(es) read from the annotations (sorted): %s", root / "classes.txt",
             len(names), ", ".join(names))
    return names


def read_annotation(path: Path) -> dict[str, Any]:
    """One VOC XML: ``{"filename", "size": (W, H) or None, "objects": [(name, [x1, y1, x2, y2],
    difficult)]}``.

    VOC pixel coordinates are 1-based and inclusive; boxes come back 0-based (``xmin - 1``, ``ymin - 1``)
    as continuous pixel edges.
    """
    try:
        tree = parse(str(path))
    except ParseError as exc:
        line = getattr(exc, "position", (0, 0))[0]
        raise DatasetError(f"voc: {path}:{line}: not valid XML ({exc})") from None
    except OSError as exc:
        raise DatasetError(f"voc: cannot read {path}: {exc}") from None
    except Exception as exc:  # defusedxml's refusals (entities, DTDs)
        raise DatasetError(f"voc: {path}: refused ({type(exc).__name__}: {exc})") from None
    ann = tree.getroot()
    size = None
    w, h = ann.findtext("size/width"), ann.findtext("size/height")
    if w and h and float(w) > 0 and float(h) > 0:
        size = (int(float(w)), int(float(h)))
    objects = []
    for n, obj in enumerate(ann.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        try:
            if box is None:
                raise ValueError("no bndbox")
            x1, y1, x2, y2 = (float(box.findtext(k) or "") for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as exc:
            raise DatasetError(
                f"voc: {path}: object {n} ({name or 'unnamed'}) has no valid bndbox ({exc})") from None
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true")
        objects.append((name, [x1 - 1, y1 - 1, x2, y2], difficult))
    return {"filename": (ann.findtext("filename") or "").strip(), "size": size, "objects": objects}


def _ids(root: Path, split: str) -> list[str] | None:
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        return None
    return [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]


def _image_path(root: Path, image_id: str, filename: str) -> Path:
    images = root / "JPEGImages"
    named = images / filename if filename else None
    if named is not None and named.is_file():
        return named
    for ext in (".jpg", ".jpeg", ".png"):
        if (images / f"{image_id}{ext}").is_file():
            return images / f"{image_id}{ext}"
    return named or images / f"{image_id}.jpg"


def read_annotations(root: Path, ids: list[str], split: Split) -> list[dict[str, Any]]:
    """:func:`read_annotation` of each id; ids without an XML file are one error listing them."""
    no_xml = [str(root / "Annotations" / f"{i}.xml") for i in ids
              if not (root / "Annotations" / f"{i}.xml").is_file()]
    if no_xml:
        raise _offenders(f"annotation file(s) listed for {split} do not exist", no_xml,
                         "Fix ImageSets/Main or add the XML files")
    return [read_annotation(root / "Annotations" / f"{i}.xml") for i in ids]


def voc_split(root: Path, ids: list[str], classes: list[str], split: Split, skip_bad_images: bool,
              annotations: list[dict[str, Any]] | None = None) -> ImageDataset:
    """The images ``ids`` of ``root`` as a detection :class:`ImageDataset` (targets carry ``iscrowd``);
    ``annotations`` are those ids' parsed XML files when already read."""
    index = {c: i for i, c in enumerate(classes)}
    anns = read_annotations(root, ids, split) if annotations is None else annotations
    unknown = [f"{root / 'Annotations' / f'{i}.xml'} '{name}'" for i, a in zip(ids, anns, strict=True)
               for name, _, _ in a["objects"] if name not in index]
    if unknown:
        raise _offenders(f"object(s) for {split} have an unknown class name", unknown,
                         f"Known: {', '.join(classes)}; list your classes in "
                         f"{root / 'classes.txt'} (one per line)")
    paths = [_image_path(root, i, a["filename"]) for i, a in zip(ids, anns, strict=True)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise _offenders(f"image(s) named by the {split} annotations do not exist", missing,
                         f"Check {root / 'JPEGImages'}")
    good = check_images(paths, skip_bad_images)
    targets, out_paths, clipped, dropped, difficult = [], [], 0, 0, 0
    for k in good:
        a = anns[k]
        size = a["size"]
        if size is None:
            with Image.open(paths[k]) as pil:
                size = pil.size
        objs = a["objects"]
        boxes = np.asarray([o[1] for o in objs], dtype=np.float32).reshape(-1, 4)
        # labels and the difficult flag travel together through clipping and dropping
        coded = np.asarray([index[o[0]] * 2 + int(o[2]) for o in objs], dtype=np.int64)
        b, code, c, d = sanitize_boxes(boxes, coded, int(size[0]), int(size[1]))
        clipped, dropped = clipped + c, dropped + d
        crowd = (code % 2).astype(np.int64)
        difficult += int(crowd.sum())
        targets.append({"boxes": b, "labels": code // 2, "iscrowd": crowd})
        out_paths.append(paths[k])
    _log_box_fixes(f"voc {split}", clipped, dropped)
    if difficult:
        log.info("voc %s: %d difficult object(s) are trained on and ignored by the evaluation", split,
                 difficult)
    classes_from = "classes.txt" if (root / "classes.txt").is_file() else "annotations"
    return ImageDataset("voc", split, "detect", classes, "RGB", out_paths, targets, None,
                        {"root": str(root), "image_ids": [ids[k] for k in good], "dropped_boxes": dropped,
                         "clipped_boxes": clipped, "difficult": difficult, "classes_from": classes_from})


def open_voc(root: str, *, val_fraction: float = 0.2, seed: int = 0, skip_bad_images: bool = False,
             **_: Any) -> tuple[ImageDataset, ImageDataset]:
    """``ImageSets/Main/train.txt`` and ``val.txt`` when both exist; otherwise ``trainval.txt`` (or every
    annotation) split by ``val_fraction`` and ``seed``. Without ``classes.txt`` the classes come from the
    annotations of both splits (:func:`classes_from_annotations`)."""
    base = voc_root(root)
    train_ids, val_ids = _ids(base, "train"), _ids(base, "val")
    if train_ids is not None and val_ids is not None:
        train_anns = read_annotations(base, train_ids, "train")
        val_anns = read_annotations(base, val_ids, "val")
        classes = voc_classes(base, train_anns + val_anns)
        return (voc_split(base, train_ids, classes, "train", skip_bad_images, train_anns),
                voc_split(base, val_ids, classes, "val", skip_bad_images, val_anns))
    every = _ids(base, "trainval") or sorted(p.stem for p in (base / "Annotations").glob("*.xml"))
    if not every:
        raise DatasetError(f"voc: {base / 'Annotations'} holds no .xml files")
    anns = read_annotations(base, every, "train")
    classes = voc_classes(base, anns)
    return _split(voc_split(base, every, classes, "train", skip_bad_images, anns), val_fraction, seed)


__all__ = ["VOC_CLASSES", "classes_from_annotations", "open_voc", "read_annotation", "read_annotations",
           "voc_classes", "voc_root", "voc_split"]
