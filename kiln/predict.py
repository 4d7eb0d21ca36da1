"""``kiln predict BUNDLE IMAGE...``: run a bundle on image files and print the top-k labels or the boxes.

Results come from :func:`kiln.outputs.predictions`, the function the server answers with, so the
command line and the REST answer agree.
"""

from __future__ import annotations

import argparse
import glob as globmod
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.cli import HelpFormatter, choice, non_negative_float, positive_int
from kiln.errors import KilnError
from kiln.vocab import BACKEND_CHOICES, PRECISIONS

if TYPE_CHECKING:
    from PIL import Image



def register(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="run a bundle on image files and print the top-k labels or the boxes",
        formatter_class=HelpFormatter,
        description=(
            "Run a bundle on images with the same pre- and post-processing as the server.\n\n"
            "example:\n"
            "  kiln predict runs/digits digit.png other.png --top-k 3\n"
            "  kiln predict runs/shapes street.jpg --save out/ --json\n"
            "  kiln predict runs/shapes photos/ 'more/*.jpg' --conf 0.4 --iou 0.5 --classes circle,square --save out/"
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with kiln.json)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (PNG, JPEG, ...), folders (their images, sorted) or glob patterns ('data/*.jpg', 'data/**/*.png')")
    p.add_argument("--backend", type=choice("backend", BACKEND_CHOICES), default="auto",
                   help="runtime: auto tries TensorRT, then ONNX Runtime, then PyTorch")
    p.add_argument("--precision", type=choice("precision", PRECISIONS), default=None,
                   help="artifact precision (default: the backend's choice)")
    p.add_argument("--top-k", type=positive_int, default=None, help="classification: labels per image (default: kiln.json)")
    p.add_argument("--save", type=Path, default=None, metavar="OUT_DIR",
                   help="write each image with its boxes (or top label) drawn to OUT_DIR/NAME.png")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    d = p.add_argument_group("detection (defaults: the bundle's kiln.json)")
    d.add_argument("--conf", type=unit_float, default=None, help="score threshold in [0, 1]")
    d.add_argument("--iou", type=unit_float, default=None, help="NMS IoU threshold in [0, 1]")
    d.add_argument("--max-det", type=positive_int, default=None, help="detections kept per image")
    d.add_argument("--agnostic", action="store_true", default=None, help="NMS across classes (one box per object)")
    d.add_argument("--multi-label", action="store_true", default=None,
                   help="a box once per class over the threshold (default: its best class only)")
    d.add_argument("--classes", type=_names, default=None, metavar="A,B",
                   help="keep only these classes (labels or indices, comma-separated)")
    p.set_defaults(func=run)


def unit_float(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got '{text}'")
    return value


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected class names or indices separated by commas")
    return names


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given, folders as their images (sorted, not recursive) and glob patterns expanded
    (``**`` recurses); a folder or pattern without images, or a missing file, is an error."""
    from kiln.data import IMG_EXTENSIONS

    out: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            kind = "folder"
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(p) for p in globmod.glob(str(path), recursive=True) if Path(p).is_file())
            kind = "pattern"
        elif path.is_file():
            out.append(path)
            continue
        else:
            raise KilnError(f"cannot read {item}: no such file, folder or matching pattern")
        if not found:
            what = "matches no files" if kind == "pattern" else f"holds no images ({', '.join(IMG_EXTENSIONS)})"
            raise KilnError(f"{kind} {item} {what}")
        out.extend(found)
    return out


def run(args: argparse.Namespace) -> int:
    from kiln import processing
    from kiln.bundle import Bundle
    from kiln.outputs import predictions
    from kiln.runtime import load
    from kiln.runtime.base import pad_batch

    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    detect = _detect_controls(args, m)
    paths = expand_inputs(args.images)
    images: list[Image.Image] = []
    for path in paths:
        try:
            images.append(processing.load_image(path, spec=m.preprocess))
        except OSError as exc:
            raise KilnError(f"cannot read {path}: {exc.strerror or exc}") from None
        except processing.ImageDecodeError as exc:
            raise KilnError(f"{path}: {exc}") from None
    results: list[dict[str, Any]] = []
    with load(bundle, backend=args.backend, precision=args.precision) as backend:
        step = backend.max_batch
        for i in range(0, len(images), step):
            chunk = images[i : i + step]
            x, boxes = processing.preprocess(chunk, m.preprocess)
            feeds, _ = pad_batch({m.input.name: x}, backend.min_batch)
            out = backend.infer(feeds)
            out = {k: v[: len(chunk)] for k, v in out.items()}
            results.extend(predictions(m, out, boxes, args.top_k, detect))
        info = {"backend": backend.name, "precision": backend.precision, "device": backend.device}
    for path, res in zip(paths, results, strict=True):
        res["image"] = str(path)
    if args.save is not None:
        from kiln.draw import save_prediction

        for name, img, res in zip(_unique_names(paths), images, results, strict=True):
            save_prediction(args.save / f"{name}.png", img, res, m.classes)
        print(f"saved {len(results)} image(s) with their {'boxes' if m.task == 'detect' else 'labels'} to {args.save}",
              file=sys.stderr)
    if args.json:
        json.dump({"model": bundle.name, "task": m.task, **info, "predictions": results}, sys.stdout, indent=2)
        print()
    else:
        _print_text(m.task, results)
    return 0


def _detect_controls(args: argparse.Namespace, m: Any) -> Any:
    """kiln.json's detection controls with the flags given; detection flags on a classifier are an error."""
    from kiln.processing import detect_overrides

    given = [f for f in ("conf", "iou", "max_det", "agnostic", "multi_label", "classes") if getattr(args, f, None) is not None]
    if m.task != "detect":
        if given:
            raise KilnError(f"--{given[0].replace('_', '-')} applies to detection bundles; this one classifies (use --top-k)")
        return None
    if args.top_k is not None:
        raise KilnError("--top-k applies to classification; use --max-det to limit the boxes per image")
    return detect_overrides(m.detect_post(), m.classes, conf=args.conf, iou=args.iou, max_det=args.max_det,
                            agnostic=args.agnostic, multi_label=args.multi_label, only=args.classes)


def _print_text(task: str, results: list[dict[str, Any]]) -> None:
    for res in results:
        if task == "classify":
            tops = ", ".join(f"{r['label']} {r['score']:.3f}" for r in res["top_k"])
            print(f"{res['image']}: {tops}")
        else:
            print(f"{res['image']}: {len(res['boxes'])} object(s)")
            for d in res["boxes"]:
                x1, y1, x2, y2 = d["box"]
                print(f"  {d['label']:<16} {d['score']:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")


def _unique_names(paths: list[Path]) -> list[str]:
    taken: set[str] = set()
    names = []
    for p in paths:
        stem = name = Path(p).stem or "image"
        n = 0
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        names.append(name)
    return names
