"""Draw a prediction on its image for people to look at (``kiln predict --save``).

Boxes are drawn from the lowest score up, so where boxes overlap the most confident one is on top;
each class has its own colour, each label sits on a filled background in that colour, and a legend
lists the classes present. Small images are scaled up first so the text stays legible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from kiln.fsutil import atomic_path
from kiln.processing import source_size

MIN_SIDE = 256  # images are scaled up by the whole factor that brings the longer side closest to this
# Kelly/Tableau-like colours chosen to stay apart from each other and readable under white or black text
PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (0, 0, 128), (255, 225, 25),
)


def class_color(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def _text_color(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    luma = 0.299 * bg[0] + 0.587 * bg[1] + 0.114 * bg[2]
    return (0, 0, 0) if luma > 150 else (255, 255, 255)


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # older Pillow: one bitmap size
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: tuple[int, int, int],
           font: Any, bounds: tuple[int, int]) -> None:
    """``text`` on a filled box in ``color`` just above ``xy`` (below it when there is no room)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x = min(max(0.0, xy[0]), max(0.0, bounds[0] - w))
    y = xy[1] - h if xy[1] - h >= 0 else xy[1]
    draw.rectangle((x, y, x + w, y + h), fill=color)
    draw.text((x + 2 - left, y + 2 - top), text, fill=_text_color(color), font=font)


def _legend(draw: ImageDraw.ImageDraw, entries: list[tuple[str, tuple[int, int, int]]], font: Any,
            width: int) -> None:
    y = 4.0
    for name, color in entries:
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        h = bottom - top + 4
        x = width - (right - left) - h - 10
        draw.rectangle((x, y, x + h - 2, y + h - 2), fill=color, outline=(255, 255, 255))
        _label(draw, (x + h, y + h), name, (0, 0, 0), font, (width, 10**6))
        y += h + 2


def render(img: Image.Image, res: dict[str, Any], classes: list[str] | None = None) -> Image.Image:
    """A copy of ``img`` with the result of :func:`kiln.outputs.predictions` drawn on it."""
    canvas = img.convert("RGB")
    scale = max(1, round(MIN_SIDE / max(canvas.size)))  # whole factors keep the pixels crisp
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(12, min(canvas.size) // 32))
    if "top_k" in res:
        best = res["top_k"][0] if res["top_k"] else None
        if best is not None:
            _label(draw, (4, 4), f"{best['label']} {best['score']:.2f}", class_color(best["index"]), font,
                   canvas.size)
        return canvas
    zoom = canvas.width / source_size(img)[0]  # boxes are in the file's pixels; img may be decoded smaller
    line = max(2, min(canvas.size) // 150)
    dets = sorted(res["boxes"], key=lambda d: d["score"])  # ascending: the best box is drawn last, on top
    for d in dets:
        color = class_color(d["index"])
        x1, y1, x2, y2 = (v * zoom for v in d["box"])
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line)
        _label(draw, (x1, y1), f"{d['label']} {d['score']:.2f}", color, font, canvas.size)
    present = sorted({d["index"] for d in dets})
    names = classes or []
    _legend(draw, [(names[i] if i < len(names) else str(i), class_color(i)) for i in present], font,
            canvas.width)
    return canvas


def save_prediction(out: str | os.PathLike[str], img: Image.Image, res: dict[str, Any],
                    classes: list[str] | None = None) -> Path:
    """Write :func:`render`'s picture to ``out`` (PNG) atomically and return the path."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        render(img, res, classes).save(tmp, format="PNG")
    return target


__all__ = ["class_color", "render", "save_prediction"]
