"""The decompression-bomb guard: pixels per byte, judged from the header, above a floor of 4 Mpx."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from kiln.processing import ImageDecodeError
from kiln.serve.images import BOMB_FLOOR_PIXELS, open_images


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_ratio_boundary() -> None:
    blob = _png(3000, 2000)  # 6 Mpx of one colour: a few KB
    ratio = 3000 * 2000 / len(blob)
    assert open_images([blob], 10**9, 10**9, max_pixels_per_byte=ratio)  # exactly at the ratio: allowed
    with pytest.raises(ImageDecodeError,
                       match=r"3000x2000 = 6000000 pixels from \d+ bytes.*decompression bomb"):
        open_images([blob], 10**9, 10**9, max_pixels_per_byte=ratio * 0.99)


def test_small_images_are_never_judged_by_ratio() -> None:
    side = int(BOMB_FLOOR_PIXELS**0.5)  # at the floor, not above it
    assert open_images([_png(side, side)], 10**9, 10**9, max_pixels_per_byte=1.0)


def test_the_bomb_names_its_image_among_several() -> None:
    ok = _png(8, 8)
    with pytest.raises(ImageDecodeError, match="image 1: .*decompression bomb"):
        open_images([ok, _png(3000, 3000)], 10**9, 10**9)
