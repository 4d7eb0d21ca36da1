"""Images as users send them, for tests and benchmarks in every folder: camera photos from 24x24 to
4000x3000, PNG, JPEG and WebP, about 1 KB to 15 MB, EXIF-rotated, RGBA, palette, grayscale, 16-bit, CMYK.

Every image is cut and resized from scikit-learn's two sample photos (``load_sample_images``, shipped
with the package, no download), so their pixels are real photo content. Encoding the large ones takes
seconds, so :func:`build_corpus` writes each file once into a folder and reads it back on later calls;
the ``corpus`` fixture (tests/conftest.py) does it once per test session.

    from tests.corpus import build_corpus
    for item in build_corpus(tmp_path):          # CorpusImage: name, path, data, size (W, H as displayed)
        ...
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class CorpusImage:
    """One file of the corpus: its bytes, where they are, and its size as displayed (after EXIF)."""

    name: str
    path: Path
    size: tuple[int, int]  # (W, H) as displayed
    note: str

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    @property
    def mime(self) -> str:
        return {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}[self.path.suffix]


@functools.cache
def photos() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's sample photos, ``uint8 [427, 640, 3]`` each (china, flower)."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    return np.asarray(china), np.asarray(flower)


def photo(size: tuple[int, int], which: int = 0, crop: tuple[float, float, float, float] = (0, 0, 1, 1),
          grain: float = 0.0, seed: int = 0) -> Image.Image:
    """A real photo cropped to the fraction ``crop`` (left, top, right, bottom), resized to ``size`` (W, H)
    with bicubic resampling; ``grain`` adds Gaussian sensor-like noise (std in grey levels), which is what
    makes a large photo as heavy to compress as a camera's."""
    src = Image.fromarray(photos()[which])
    w, h = src.size
    box = (round(crop[0] * w), round(crop[1] * h), round(crop[2] * w), round(crop[3] * h))
    img = src.crop(box).resize(size, Image.Resampling.BICUBIC)
    if grain:
        arr = np.asarray(img, dtype=np.float32)
        arr += np.random.default_rng(seed).normal(0, grain, arr.shape).astype(np.float32)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif.tobytes()


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _tiny_png() -> bytes:
    return _encode(photo((24, 24), crop=(0.4, 0.3, 0.5, 0.45)), "PNG")


def _grey_jpeg() -> bytes:
    return _encode(photo((64, 48), which=1).convert("L"), "JPEG", quality=85)


def _rgba_exif6_png() -> bytes:
    """Stored 320x240 with a transparent left third and EXIF Orientation 6: displayed 240x320."""
    img = photo((320, 240), which=1).convert("RGBA")
    alpha = np.full((240, 320), 255, np.uint8)
    alpha[:, :107] = 0
    alpha[:, 107:160] = 128
    img.putalpha(Image.fromarray(alpha))
    return _encode(img, "PNG", exif=_exif(6))


def _palette_png() -> bytes:
    img = photo((200, 150)).quantize(64)
    img.info["transparency"] = 0
    return _encode(img, "PNG", transparency=0)


def _grey_alpha_png() -> bytes:
    grey = photo((160, 120), which=1).convert("L")
    alpha = Image.linear_gradient("L").resize((160, 120))
    return _encode(Image.merge("LA", (grey, alpha)), "PNG")


def _grey16_png() -> bytes:
    """A 16-bit greyscale PNG (as scientific and medical cameras write them), the full 0-65535 range."""
    grey = np.asarray(photo((640, 480)).convert("L"), dtype=np.uint16)
    return _encode(Image.fromarray(grey * 257), "PNG")


def _webp() -> bytes:
    return _encode(photo((640, 427), which=1), "WEBP", quality=80)


def _rgba_webp() -> bytes:
    img = photo((300, 200)).convert("RGBA")
    img.putalpha(Image.linear_gradient("L").rotate(90).resize((300, 200)))
    return _encode(img, "WEBP", quality=80)


def _cmyk_jpeg() -> bytes:
    return _encode(photo((400, 300), which=1).convert("CMYK"), "JPEG", quality=90)


def _phone_jpeg() -> bytes:
    """A 1920x1080 phone photo stored sideways (EXIF Orientation 6): displayed 1080x1920, ~0.5 MB."""
    return _encode(photo((1920, 1080), grain=3.0), "JPEG", quality=88, exif=_exif(6))


def _hd_jpeg() -> bytes:
    return _encode(photo((1920, 1080), which=1, grain=3.0, seed=1), "JPEG", quality=90)


def _camera_jpeg() -> bytes:
    """A 12 Mpx camera JPEG, 4000x3000, a few MB."""
    return _encode(photo((4000, 3000), which=1, grain=4.0, seed=2), "JPEG", quality=95, exif=_exif(1))


def _camera_png() -> bytes:
    """A 12 Mpx screenshot-style PNG of a photo: ~15 MB, the largest upload a user sends."""
    return _encode(photo((4000, 3000), grain=0.5, seed=3), "PNG", compress_level=1)


# name -> (builder, displayed size, note). Ordered by size.
SPECS: dict[str, tuple[Callable[[], bytes], tuple[int, int], str]] = {
    "tiny-24.png": (_tiny_png, (24, 24), "24x24 RGB PNG, ~1-2 KB"),
    "grey-64.jpg": (_grey_jpeg, (64, 48), "greyscale JPEG"),
    "grey-alpha-160.png": (_grey_alpha_png, (160, 120), "LA PNG, alpha gradient"),
    "palette-200.png": (_palette_png, (200, 150), "P PNG with a transparent index"),
    "rgba-300.webp": (_rgba_webp, (300, 200), "RGBA WebP"),
    "rgba-exif6-320.png": (_rgba_exif6_png, (240, 320), "RGBA PNG, EXIF Orientation 6"),
    "cmyk-400.jpg": (_cmyk_jpeg, (400, 300), "CMYK JPEG"),
    "photo-640.webp": (_webp, (640, 427), "RGB WebP"),
    "grey16-640.png": (_grey16_png, (640, 480), "16-bit greyscale PNG"),
    "phone-exif6-1920.jpg": (_phone_jpeg, (1080, 1920), "1920x1080 JPEG, EXIF Orientation 6"),
    "hd-1920.jpg": (_hd_jpeg, (1920, 1080), "1920x1080 JPEG"),
    "camera-4000.jpg": (_camera_jpeg, (4000, 3000), "4000x3000 JPEG, 12 Mpx"),
    "camera-4000.png": (_camera_png, (4000, 3000), "4000x3000 PNG, ~15 MB"),
}

LARGEST = "camera-4000.png"


def build_corpus(folder: Path, names: list[str] | None = None) -> list[CorpusImage]:
    """The corpus files (all, or ``names``) in ``folder``, each encoded on first use and kept there."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names or list(SPECS):
        build, size, note = SPECS[name]
        path = folder / name
        if not path.exists():
            tmp = path.with_suffix(path.suffix + ".part")
            tmp.write_bytes(build())
            tmp.replace(path)
        out.append(CorpusImage(name, path, size, note))
    return out


__all__ = ["LARGEST", "SPECS", "CorpusImage", "build_corpus", "photo", "photos"]
