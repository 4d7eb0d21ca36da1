"""``kiln predict BUNDLE IMAGE...``: run a bundle on image files and print the top-k labels or the boxes.

Results come from :func:`kiln.outputs.predictions`, the function the server answers with, so the
command line and the REST answer agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.cli import HelpFormatter, choice, positive_int
from kiln.errors import KilnError

if TYPE_CHECKING:
    from PIL import Image

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="run a bundle on image files and print the top-k labels or the boxes",
        formatter_class=HelpFormatter,
        description=(
            "Run a bundle on images with the same pre- and post-processing as the server.\n\n"
            "example:\n"
            "  kiln predict runs/digits digit.png other.png --top-k 3\n"
            "  kiln predict runs/shapes street.jpg --save out/ --json"
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with kiln.json)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--backend", type=choice("backend", _backends), default="auto",
                   help="runtime: auto tries TensorRT, then ONNX Runtime, then PyTorch")
    p.add_argument("--precision", type=choice("precision", PRECISIONS), default=None,
                   help="artifact precision (default: the backend's choice)")
    p.add_argument("--top-k", type=positive_int, default=None, help="classification: labels per image (default: kiln.json)")
    p.add_argument("--save", type=Path, default=None, metavar="OUT_DIR",
                   help="write each image with its boxes (or top label) drawn to OUT_DIR/NAME.png")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.set_defaults(func=run)


def _backends() -> list[str]:
    from kiln.runtime import BACKENDS

    return ["auto", *BACKENDS]


def run(args: argparse.Namespace) -> int:
    from kiln import processing
    from kiln.bundle import Bundle
    from kiln.outputs import predictions
    from kiln.runtime import load

    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    images: list[Image.Image] = []
    for path in args.images:
        try:
            images.append(processing.load_image(path))
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
            pad = max(0, backend.min_batch - len(chunk))
            if pad:
                x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            out = backend.infer({m.input.name: x})
            out = {k: v[: len(chunk)] for k, v in out.items()}
            results.extend(predictions(m, out, boxes, args.top_k))
        info = {"backend": backend.name, "precision": backend.precision, "device": backend.device}
    for path, res in zip(args.images, results, strict=True):
        res["image"] = str(path)
    if args.save is not None:
        for path, img, res in zip(_unique_names(args.images), images, results, strict=True):
            _save(args.save / f"{path}.png", img, res)
    if args.json:
        json.dump({"model": bundle.name, "task": m.task, **info, "predictions": results}, sys.stdout, indent=2)
        print()
    else:
        _print_text(m.task, results)
    return 0


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


def _unique_names(paths: list[str]) -> list[str]:
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


_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def _save(out: Path, img: Image.Image, res: dict[str, Any]) -> None:
    """Draw the result on a copy of ``img`` (small images are upscaled so the text stays legible)."""
    from PIL import Image, ImageDraw

    from kiln.fsutil import atomic_path

    canvas = img.convert("RGB")
    scale = max(1, 256 // max(canvas.size))
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    if "top_k" in res:
        best = res["top_k"][0]
        text = f"{best['label']} {best['score']:.2f}"
        box = draw.textbbox((4, 4), text)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
        draw.text((4, 4), text, fill=(255, 255, 0))
    else:
        for d in res["boxes"]:
            color = _COLORS[d["index"] % len(_COLORS)]
            x1, y1, x2, y2 = (v * scale for v in d["box"])
            draw.rectangle((x1, y1, x2, y2), outline=color, width=2)
            draw.text((x1 + 2, max(0.0, y1 - 12)), f"{d['label']} {d['score']:.2f}", fill=color)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="PNG")
