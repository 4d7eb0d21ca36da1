import io

import numpy as np
import pytest
from PIL import Image

from kiln.bundle import ClassifyPost, Preprocess
from kiln.processing import ImageDecodeError, classify_topk, decode_image, preprocess, softmax, to_unit


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "I;16", "1"])
def test_decode_converts_modes(mode: str):
    img = Image.new("RGB", (7, 5), (200, 30, 10)).convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = decode_image(_png(img, fmt))
    assert out.mode in ("L", "RGB") and out.size == (7, 5)


def test_decode_rejects_bad_input():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"hello world")
    jpeg = _png(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(_png(Image.new("L", (100, 100))), max_pixels=5000)


def test_letterbox_maps_boxes_back():
    spec = Preprocess(mode="letterbox", size=(64, 64), channels="RGB", mean=[0, 0, 0], std=[1, 1, 1])
    img = Image.new("RGB", (200, 100))
    arr, lb = to_unit(img, spec)
    assert arr.shape == (3, 64, 64)
    assert lb.pad_x == 0 and lb.pad_y == 16 and lb.scale_x == pytest.approx(0.32)
    box_in_input = np.array([[0, 16, 64, 48]], dtype=np.float32)
    np.testing.assert_allclose(lb.to_original(box_in_input), [[0, 0, 200, 100]], atol=1e-4)


def test_preprocess_normalizes_and_topk():
    spec = Preprocess(size=(4, 4), channels="L", mean=[0.5], std=[0.25])
    x, _ = preprocess([Image.new("L", (8, 8), 255)], spec)
    assert x.shape == (1, 1, 4, 4) and np.allclose(x, 2.0)
    logits = np.array([[0.0, 3.0, 1.0]], dtype=np.float32)
    assert np.allclose(softmax(logits).sum(1), 1)
    top = classify_topk(logits, ["a", "b", "c"], ClassifyPost(top_k=2))
    assert [t["label"] for t in top[0]] == ["b", "c"]
