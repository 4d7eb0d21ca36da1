"""On-demand measurement of the INT8 targets (not collected by pytest: not a test_ file).

    python tests/export/bench_int8_targets.py synth32 DIR --kind hue --per-class 80
    kiln train --data folder:DIR --model resnet18 --epochs 3 --batch-size 16 --workers 0 --out runs/r18
    kiln export runs/r18 --precision fp32,int8 --max-accuracy-drop 0.5

``--kind hue`` (class = hue of a rectangle on noise) is what a 2-core CPU trains in minutes;

``--kind patterns`` writes a harder 10-class, 32x32 RGB image folder (``DIR/<class>/<i>.png``): stripes in
three orientations, checkerboard, disc, square, ring, cross, triangle and dots, each with random colours,
position, size, frequency and pixel noise, so a classifier must learn spatial features.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("hstripes", "vstripes", "dstripes", "checker", "disc", "square", "ring", "cross", "triangle",
           "dots")


def _pattern(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A boolean foreground mask ``[size, size]`` for one class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4, 9)
    phase = rng.uniform(0, period)
    cx, cy = rng.uniform(10, 22, size=2)
    r = rng.uniform(5, 10)
    if kind == "hstripes":
        return ((yy + phase) % period) < period / 2
    if kind == "vstripes":
        return ((xx + phase) % period) < period / 2
    if kind == "dstripes":
        return ((xx + yy + phase) % period) < period / 2
    if kind == "checker":
        return (((xx + phase) // (period / 2)) + ((yy + phase) // (period / 2))) % 2 == 0
    if kind == "disc":
        return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
    if kind == "square":
        return (np.abs(xx - cx) < r * 0.8) & (np.abs(yy - cy) < r * 0.8)
    if kind == "ring":
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        return (d < r) & (d > r * 0.55)
    if kind == "cross":
        w = r * 0.3
        return ((np.abs(xx - cx) < w) & (np.abs(yy - cy) < r)) | (
            (np.abs(yy - cy) < w) & (np.abs(xx - cx) < r)
        )
    if kind == "triangle":
        return (yy - cy < r * 0.7) & (yy - cy > -r) & (np.abs(xx - cx) < (yy - cy + r) * 0.6)
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(5, 12))):
        px, py = rng.uniform(2, size - 2, size=2)
        mask |= (xx - px) ** 2 + (yy - py) ** 2 < rng.uniform(1.5, 3.0) ** 2
    return mask


def make_hue32(root: Path, per_class: int = 80, seed: int = 0) -> None:
    """An easy 10-class set a CPU can train resnet18 on in minutes: class = hue of a rectangle on noise."""
    import colorsys

    rng = np.random.default_rng(seed)
    for c in range(10):
        folder = root / f"hue{c}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = np.array(colorsys.hsv_to_rgb(c / 10, 0.9, 0.9)) * 255
        for i in range(per_class):
            img = rng.integers(0, 80, (32, 32, 3)).astype(np.float64)
            x, y = rng.integers(0, 16, 2)
            w, h = rng.integers(8, 16, 2)
            img[y : y + h + 1, x : x + w + 1] = rgb
            Image.fromarray(img.astype(np.uint8), "RGB").save(folder / f"{i:04d}.png")


def make_synth32(root: Path, per_class: int = 200, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fg, bg = rng.uniform(0, 255, size=(2, 3))
            while np.abs(fg - bg).sum() < 150:  # enough contrast to see the shape
                fg, bg = rng.uniform(0, 255, size=(2, 3))
            mask = _pattern(kind, rng)[..., None]
            img = np.where(mask, fg, bg) + rng.normal(0, 12, size=(32, 32, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(folder / f"{i:04d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth32", help="write the synthetic 32x32 10-class image folder")
    s.add_argument("dir", type=Path)
    s.add_argument("--per-class", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kind", choices=("patterns", "hue"), default="patterns")
    args = p.parse_args()
    (make_hue32 if args.kind == "hue" else make_synth32)(args.dir, args.per_class, args.seed)
    print(f"wrote {10 * args.per_class} images under {args.dir}")


if __name__ == "__main__":
    main()
