"""Pixel values after decoding, classification scores as probabilities, and NMS at its boundary."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kiln.bundle import ClassifyPost, DetectPost
from kiln.processing import classify_topk, decode_image, detect_postprocess, nms, softmax, to_8bit


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# ---- image conversion ------------------------------------------------------------------------------


def test_transparent_pixels_become_black() -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, :, 3] = 0  # fully transparent row
    rgba[1, :, 3] = 255  # opaque row
    out = np.asarray(decode_image(_encode(Image.fromarray(rgba, "RGBA"))))
    assert out.shape == (2, 3, 3)
    assert (out[0] == 0).all()
    assert (out[1] == (200, 100, 50)).all()


def test_half_transparent_pixels_are_scaled_towards_black() -> None:
    rgba = np.zeros((1, 1, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 128)
    out = np.asarray(decode_image(_encode(Image.fromarray(rgba, "RGBA"))))[0, 0].astype(int)
    np.testing.assert_allclose(out, np.array([200, 100, 50]) * 128 / 255, atol=1.5)


def test_grey_with_alpha_composites_over_black() -> None:
    la = Image.merge("LA", (Image.new("L", (4, 1), 240), Image.new("L", (4, 1), 0)))
    out = np.asarray(decode_image(_encode(la)))
    assert out.shape == (1, 4) and (out == 0).all()


def test_palette_with_transparency_composites_over_black() -> None:
    rgba = Image.new("RGBA", (3, 3), (255, 255, 255, 0))
    p = rgba.convert("PA") if "PA" in Image.MODES else rgba.convert("P")
    out = np.asarray(to_8bit(p.convert("RGBA")))
    assert (out == 0).all()


@pytest.mark.parametrize(("value", "expected"), [(65535, 255), (32768, 128), (0, 0), (257, 1), (1000, 4)])
def test_16_bit_images_are_rescaled_to_8_bit(value: int, expected: int) -> None:
    arr = np.full((2, 2), value, np.uint16)
    arr[0, 0] = 65535  # the full 16-bit range is in use
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = np.asarray(decode_image(_encode(img)))
    assert out.dtype == np.uint8
    assert out[0, 0] == 255
    assert out[1, 1] == expected


def test_16_bit_mode_in_memory_is_rescaled() -> None:
    img = Image.fromarray(np.array([[0, 65535], [13107, 52428]], np.uint16))
    out = np.asarray(to_8bit(img))
    np.testing.assert_array_equal(out, [[0, 255], [51, 204]])


# ---- classification scores -------------------------------------------------------------------------


def test_topk_scores_are_probabilities_that_match_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, 10)) * 5).astype(np.float32)
    logits[0] = [12.0, -3.0, 40.0, 0, 0, 0, 0, 0, 0, 0]  # well outside [0, 1] as raw values
    classes = [str(i) for i in range(10)]
    full = classify_topk(logits, classes, ClassifyPost(top_k=10))
    top3 = classify_topk(logits, classes, ClassifyPost(top_k=3))
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    for row, ranked, short in zip(expected, full, top3, strict=True):
        scores = np.array([r["score"] for r in ranked])
        assert ((scores >= 0) & (scores <= 1)).all()
        assert scores.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(scores, row[[r["index"] for r in ranked]], rtol=1e-5, atol=1e-7)
        assert [r["index"] for r in short] == [r["index"] for r in ranked[:3]]
        assert sum(r["score"] for r in short) <= 1.0 + 1e-6


def test_softmax_is_stable_for_large_logits() -> None:
    p = softmax(np.array([[1000.0, 1000.0, -1000.0]], np.float32))
    np.testing.assert_allclose(p, [[0.5, 0.5, 0.0]], atol=1e-7)


# ---- NMS at the threshold --------------------------------------------------------------------------

# IoU([0,0,2,1], [0,0,1,1]) = 1 / 2 exactly in binary floating point.
BIG = [0.0, 0.0, 2.0, 1.0]
HALF = [0.0, 0.0, 1.0, 1.0]


def test_nms_keeps_a_box_at_exactly_the_iou_threshold() -> None:
    boxes = np.array([BIG, HALF], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, np.nextafter(np.float32(0.5), np.float32(0))).tolist() == [0]


def test_detect_postprocess_keeps_a_box_at_exactly_the_iou_threshold() -> None:
    boxes = np.array([[BIG, HALF]], np.float32)
    scores = np.array([[[0.9], [0.8]]], np.float32)
    at = detect_postprocess(boxes, scores, None, DetectPost(score_threshold=0.1, iou_threshold=0.5), ["a"])
    assert [d["score"] for d in at[0]] == pytest.approx([0.9, 0.8])
    below = detect_postprocess(boxes, scores, None, DetectPost(score_threshold=0.1, iou_threshold=0.49),
                               ["a"])
    assert [d["score"] for d in below[0]] == pytest.approx([0.9])


def test_detect_postprocess_score_threshold_is_strict() -> None:
    boxes = np.array([[BIG, [5.0, 5.0, 6.0, 6.0]]], np.float32)
    scores = np.array([[[0.5], [0.25]]], np.float32)
    out = detect_postprocess(boxes, scores, None, DetectPost(score_threshold=0.25, iou_threshold=0.5), ["a"])
    assert [d["score"] for d in out[0]] == [0.5]
