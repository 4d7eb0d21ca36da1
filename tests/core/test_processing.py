"""Pre- and post-processing (kiln/processing.py) pinned by value: what each image mode becomes, where
resize, letterbox and centre crop put the pixels and how boxes map back, per-channel normalisation, top-k
order and ties, detection candidates at their edges, and the decode errors a client reads."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from kiln.bundle import ClassifyPost, DetectPost, Preprocess
from kiln.processing import (
    PRE_NMS_TOP_K,
    ImageDecodeError,
    Letterbox,
    box_iou_one,
    classify_topk,
    decode_image,
    detect_postprocess,
    nms,
    nms_keep,
    normalize,
    preprocess,
    softmax,
    to_8bit,
    to_unit,
)


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


def spec(**kw: object) -> Preprocess:
    base: dict[str, object] = {"size": (4, 4), "channels": "L", "mean": [0.0], "std": [1.0]}
    return Preprocess.model_validate({**base, **kw})


def grey(values: list[list[int]]) -> Image.Image:
    return Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L")


def pixels(x: np.ndarray) -> np.ndarray:
    return np.rint(x * 255).astype(int)


# ---- modes ----------------------------------------------------------------------------------------

def test_l_and_rgb_pass_through_unchanged() -> None:
    for img in (grey([[1, 2], [3, 4]]), Image.new("RGB", (2, 2), (10, 20, 30))):
        out = to_8bit(img)
        assert out.mode == img.mode and out.tobytes() == img.tobytes()


def test_16_bit_scale_does_not_depend_on_the_image_content() -> None:
    # a dark 16-bit image stays dark: 200 of 65535 is 1 of 255, not 200
    img = Image.new("I;16", (2, 2), 200)
    assert np.asarray(to_8bit(img)).tolist() == [[1, 1], [1, 1]]


def test_32_bit_integer_mode_is_8_bit_data_when_it_fits_else_16_bit() -> None:
    small = Image.fromarray(np.array([[0, 200]], dtype=np.int32))
    assert to_8bit(small).mode == "L" and np.asarray(to_8bit(small)).tolist() == [[0, 200]]
    large = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert np.asarray(to_8bit(large)).tolist() == [[0, 4, 255]]


def test_float_mode_is_clipped_to_8_bit() -> None:
    img = Image.fromarray(np.array([[-5.0, 12.7, 300.0]], dtype=np.float32))
    out = to_8bit(img)
    assert out.mode == "L" and np.asarray(out).tolist() == [[0, 12, 255]]


def test_one_bit_mode_is_black_and_white_grey() -> None:
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    out = to_8bit(img)
    assert out.mode == "L" and np.asarray(out).tolist() == [[0, 255]]


def test_cmyk_becomes_rgb_by_value() -> None:
    out = to_8bit(Image.new("CMYK", (1, 1), (0, 0, 0, 0)))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    out = to_8bit(Image.new("CMYK", (1, 1), (255, 0, 0, 0)))
    assert out.getpixel((0, 0)) == (0, 255, 255)


def test_rgba_keeps_its_colour_where_opaque() -> None:
    img = Image.new("RGBA", (1, 1), (10, 200, 30, 255))
    out = to_8bit(img)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (10, 200, 30)


def test_grey_alpha_is_grey() -> None:
    img = Image.new("LA", (2, 1), (200, 255))
    img.putpixel((1, 0), (200, 0))
    out = to_8bit(img)
    assert out.mode == "L" and np.asarray(out).tolist() == [[200, 0]]


# ---- decode ---------------------------------------------------------------------------------------

def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_errors_say_what_is_wrong() -> None:
    with pytest.raises(ImageDecodeError, match=r"^empty image \(0 bytes\)$"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="^not an image: the data is not in a format PIL can read$"):
        decode_image(b"hello, world")
    data = encode(Image.new("RGB", (32, 32), (1, 2, 3)))
    with pytest.raises(ImageDecodeError, match=r"^cannot decode image \(PNG\): "):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_is_inclusive_and_names_the_sizes() -> None:
    data = encode(Image.new("L", (10, 10), 7))
    assert decode_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, max_pixels=99)
    assert str(err.value) == "image is 10x10 = 100 pixels, over the limit of 99"


def test_decode_returns_8_bit_pixels() -> None:
    out = decode_image(encode(Image.new("RGBA", (2, 2), (9, 8, 7, 255))))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (9, 8, 7)
    out = decode_image(encode(Image.new("L", (2, 2), 42)))
    assert out.mode == "L" and out.getpixel((0, 0)) == 42


# ---- resize, letterbox, centre crop ---------------------------------------------------------------

def test_resize_places_pixels_and_records_each_axis_scale() -> None:
    img = grey([[10, 20], [30, 40], [50, 60]])  # 2 wide, 3 high
    x, box = to_unit(img, spec(size=(6, 4), interpolation="nearest"))
    assert x.shape == (1, 6, 4) and x.dtype == np.float32
    assert pixels(x[0]).tolist() == [[10, 10, 20, 20]] * 2 + [[30, 30, 40, 40]] * 2 + [[50, 50, 60, 60]] * 2
    assert box == Letterbox(2.0, 2.0, 0.0, 0.0, 2, 3)
    _, box = to_unit(img, spec(size=(9, 8)))
    assert box == Letterbox(4.0, 3.0, 0.0, 0.0, 2, 3)


def test_resize_uses_the_interpolation_asked_for() -> None:
    img = grey([[0, 255]])
    near, _ = to_unit(img, spec(size=(1, 4), interpolation="nearest"))
    bilinear, _ = to_unit(img, spec(size=(1, 4), interpolation="bilinear"))
    assert pixels(near[0]).tolist() == [[0, 0, 255, 255]]
    assert 0 < pixels(bilinear[0])[0, 1] < 255


def test_image_already_at_size_is_unchanged() -> None:
    values = [[0, 255, 0, 255], [255, 0, 255, 0], [0, 255, 0, 255], [255, 0, 255, 0]]
    x, box = to_unit(grey(values), spec(size=(4, 4), interpolation="lanczos"))
    assert pixels(x[0]).tolist() == values and box == Letterbox(1.0, 1.0, 0.0, 0.0, 4, 4)


def test_rgb_input_is_channels_first() -> None:
    img = Image.new("RGB", (2, 1), (10, 20, 30))
    x, _ = to_unit(img, spec(size=(1, 2), channels="RGB", mean=[0, 0, 0], std=[1, 1, 1]))
    assert x.shape == (3, 1, 2) and x.flags["C_CONTIGUOUS"]
    assert pixels(x[:, 0, 0]).tolist() == [10, 20, 30]


def test_letterbox_pads_around_the_centred_image() -> None:
    img = grey([[200, 200, 200, 200], [200, 200, 200, 200]])  # 4 wide, 2 high
    x, box = to_unit(img, spec(mode="letterbox", size=(7, 8), pad_value=114, interpolation="nearest"))
    rows = pixels(x[0])
    # scale 2 -> 8 x 4, (7 - 4) // 2 = 1 row of padding above, 2 below
    assert rows[:, 0].tolist() == [114, 200, 200, 200, 200, 114, 114]
    assert box == Letterbox(2.0, 2.0, 0.0, 1.0, 4, 2)


def test_letterbox_pads_left_and_right_of_a_tall_image_in_rgb() -> None:
    img = Image.new("RGB", (2, 4), (200, 100, 50))
    s = spec(mode="letterbox", size=(4, 5), channels="RGB", mean=[0, 0, 0], std=[1, 1, 1], pad_value=7)
    x, box = to_unit(img, s)
    assert pixels(x[:, 0, :]).tolist() == [[7, 200, 200, 7, 7], [7, 100, 100, 7, 7], [7, 50, 50, 7, 7]]
    assert box == Letterbox(1.0, 1.0, 1.0, 0.0, 2, 4)


def test_letterbox_of_a_thin_image_keeps_at_least_one_row() -> None:
    img = grey([[255] * 100])
    x, box = to_unit(img, spec(mode="letterbox", size=(8, 8), pad_value=0, interpolation="nearest"))
    assert pixels(x[0]).sum(axis=1).tolist() == [0, 0, 0, 255 * 8, 0, 0, 0, 0]
    assert (box.pad_x, box.pad_y, box.scale_y) == (0.0, 3.0, 1.0)


def test_centre_crop_of_a_portrait_image() -> None:
    values = [[10 * r] * 4 for r in range(8)]  # 4 wide, 8 high
    x, box = to_unit(grey(values), spec(mode="center_crop", size=(4, 4), resize_size=4))
    assert pixels(x[0])[:, 0].tolist() == [20, 30, 40, 50]
    assert box == Letterbox(1.0, 1.0, 0.0, -2.0, 4, 8)


def test_centre_crop_of_a_landscape_image_resizes_the_short_side() -> None:
    values = [[10 * c for c in range(8)]] * 4  # 8 wide, 4 high
    x, box = to_unit(grey(values),
                     spec(mode="center_crop", size=(2, 2), resize_size=2, interpolation="nearest"))
    # short side 4 -> 2: 4 x 2, then the middle 2 columns
    assert x.shape == (1, 2, 2)
    assert box == Letterbox(0.5, 0.5, -1.0, -0.0, 8, 4)


def test_centre_crop_defaults_to_the_input_size_and_pads_with_black() -> None:
    x, box = to_unit(grey([[255] * 4] * 4), spec(mode="center_crop", size=(4, 6), interpolation="nearest"))
    # no resize_size: shorter side to min(4, 6) = 4, the 4 x 6 crop is wider than the image
    assert pixels(x[0])[0].tolist() == [0, 255, 255, 255, 255, 0]
    assert box == Letterbox(1.0, 1.0, 1.0, -0.0, 4, 4)


def test_to_original_undoes_each_axis_and_clips_to_the_image() -> None:
    box = Letterbox(scale_x=2.0, scale_y=4.0, pad_x=1.0, pad_y=3.0, width=10, height=5)
    out = box.to_original(np.array([[5.0, 7.0, 9.0, 11.0], [-9.0, -9.0, 99.0, 99.0]]))
    assert out.dtype == np.float32
    assert out.tolist() == [[2.0, 1.0, 4.0, 2.0], [0.0, 0.0, 10.0, 5.0]]


# ---- normalise, batch ------------------------------------------------------------------------------

def test_normalize_per_channel() -> None:
    s = spec(channels="RGB", mean=[0.1, 0.2, 0.3], std=[0.5, 1.0, 2.0])
    x = np.ones((3, 1, 2), dtype=np.float32)
    out = normalize(x, s)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [1.8, 0.8, 0.35], rtol=1e-6)
    np.testing.assert_allclose(normalize(x[None], s)[0], out)


def test_preprocess_keeps_image_order_and_placements() -> None:
    s = spec(size=(1, 1), mean=[0.5], std=[0.25])
    x, boxes = preprocess([grey([[255]]), grey([[0, 0]])], s)
    assert x.shape == (2, 1, 1, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0, 0], [2.0, -2.0])
    assert [b.width for b in boxes] == [1, 2]


@pytest.mark.parametrize(("channels", "c"), [("L", 1), ("RGB", 3)])
def test_preprocess_of_no_images_is_an_empty_batch(channels: str, c: int) -> None:
    x, boxes = preprocess([], spec(size=(3, 5), channels=channels))
    assert x.shape == (0, c, 3, 5) and x.dtype == np.float32 and boxes == []


# ---- classification --------------------------------------------------------------------------------

def test_softmax_rows_are_independent_and_float32() -> None:
    p = softmax(np.array([[0.0, np.log(2.0)], [1000.0, 1000.0]], dtype=np.float32))
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, [[1 / 3, 2 / 3], [0.5, 0.5]], rtol=1e-6)


def test_topk_orders_by_score_and_breaks_ties_by_index() -> None:
    logits = np.array([[1.0, 3.0, 3.0, 0.0]], dtype=np.float32)
    top = classify_topk(logits, ["a", "b", "c", "d"], ClassifyPost(top_k=3))
    assert [(t["label"], t["index"]) for t in top[0]] == [("b", 1), ("c", 2), ("a", 0)]
    assert top[0][0]["score"] == pytest.approx(float(softmax(logits)[0, 1]))


def test_topk_larger_than_the_classes_returns_every_class() -> None:
    top = classify_topk(np.array([[0.0, 1.0]], dtype=np.float32), ["a", "b"], ClassifyPost(top_k=5))
    assert [t["label"] for t in top[0]] == ["b", "a"]


# ---- detection --------------------------------------------------------------------------------------

def test_iou_by_value_and_zero_for_empty_boxes() -> None:
    iou = box_iou_one(np.array([0.0, 0.0, 2.0, 2.0]), np.array([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0],
                                                                 [0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0]]))
    np.testing.assert_allclose(iou, [1 / 7, 0.0, 1.0, 1 / 3])
    empty = box_iou_one(np.zeros(4), np.zeros((1, 4)))
    assert empty.tolist() == [0.0]


def test_nms_with_equal_scores_keeps_the_earlier_box() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    keep = nms(boxes, np.array([0.5, 0.5, 0.5], dtype=np.float32), 0.5)
    assert keep.tolist() == [0, 2] and keep.dtype == np.int64


def test_nms_keep_per_class_then_best_first_across_classes() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10]], dtype=np.float32)
    scores = np.array([0.6, 0.9, 0.7], dtype=np.float32)
    classes = np.array([0, 1, 0])
    assert nms_keep(boxes, scores, classes, 0.5, agnostic=False).tolist() == [1, 2]
    assert nms_keep(boxes, scores, classes, 0.5, agnostic=True).tolist() == [1]
    assert nms_keep(boxes[:0], scores[:0], classes[:0], 0.5, agnostic=False).tolist() == []


def post(**kw: object) -> DetectPost:
    return DetectPost.model_validate({"score_threshold": 0.5, "iou_threshold": 0.5, **kw})


def one_image(scores: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    n = len(scores)
    boxes = np.array([[[10.0 * i, 0.0, 10.0 * i + 5, 5.0] for i in range(n)]], dtype=np.float32)
    return boxes, np.array([scores], dtype=np.float32)


def test_best_class_only_unless_multi_label() -> None:
    boxes, scores = one_image([[0.9, 0.8, 0.1]])
    single = detect_postprocess(boxes, scores, None, post(), ["a", "b", "c"])[0]
    assert [(d["label"], d["index"]) for d in single] == [("a", 0)]
    multi = detect_postprocess(boxes, scores, None, post(multi_label=True), ["a", "b", "c"])[0]
    assert [(d["label"], d["score"]) for d in multi] == [("a", pytest.approx(0.9)), ("b", pytest.approx(0.8))]
    assert multi[0]["box"] == multi[1]["box"] == [0.0, 0.0, 5.0, 5.0]


def test_multi_label_threshold_is_strict() -> None:
    boxes, scores = one_image([[0.5, 0.75], [0.25, 0.5]])
    multi = detect_postprocess(boxes, scores, None, post(multi_label=True), ["a", "b"])[0]
    assert [(d["label"], d["box"][0]) for d in multi] == [("b", 0.0)]


def test_class_filter_never_relabels_a_box_as_a_weaker_class() -> None:
    boxes, scores = one_image([[0.9, 0.8], [0.1, 0.7]])
    out = detect_postprocess(boxes, scores, None, post(classes=[1]), ["a", "b"])[0]
    assert [(d["label"], d["box"][0]) for d in out] == [("b", 10.0)]


def test_at_most_pre_nms_top_k_candidates_the_best_ones() -> None:
    n = PRE_NMS_TOP_K + 5
    boxes = np.array([[[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(n)]], dtype=np.float32)
    scores = np.linspace(0.6, 0.99, n, dtype=np.float32).reshape(1, n, 1)
    out = detect_postprocess(boxes, scores, None, post(max_detections=n), ["a"])[0]
    assert len(out) == PRE_NMS_TOP_K
    assert min(d["score"] for d in out) == pytest.approx(float(scores[0, 5, 0]))


def test_max_detections_keeps_the_best() -> None:
    boxes, scores = one_image([[0.6], [0.9], [0.7]])
    out = detect_postprocess(boxes, scores, None, post(max_detections=2), ["a"])[0]
    assert [d["box"][0] for d in out] == [10.0, 20.0]


def test_boxes_map_back_through_each_images_letterbox() -> None:
    boxes = np.array([[[4.0, 6.0, 8.0, 10.0]], [[4.0, 6.0, 8.0, 10.0]]], dtype=np.float32)
    scores = np.array([[[0.9]], [[0.9]]], dtype=np.float32)
    lb = [Letterbox(2.0, 2.0, 0.0, 2.0, 100, 100), Letterbox(1.0, 1.0, 0.0, 0.0, 100, 100)]
    out = detect_postprocess(boxes, scores, lb, post(), ["a"])
    assert out[0][0]["box"] == [2.0, 2.0, 4.0, 4.0] and out[1][0]["box"] == [4.0, 6.0, 8.0, 10.0]


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError,
                       match=r"expected boxes \[N, A, 4\] and scores \[N, A, C\], got \(1, 2, 3\) and \(1, "
                             r"2, 1\)"):
        detect_postprocess(np.zeros((1, 2, 3)), np.zeros((1, 2, 1)), None, post(), ["a"])
    for b, s in [((2, 4), (1, 2, 1)), ((1, 2, 4), (1, 2)), ((1, 2, 4), (1, 3, 1)), ((1, 2, 4), (2, 2, 1))]:
        with pytest.raises(ValueError, match="expected boxes"):
            detect_postprocess(np.zeros(b), np.zeros(s), None, post(), ["a"])
    with pytest.raises(ValueError, match="^1 letterboxes for 2 images$"):
        detect_postprocess(np.zeros((2, 1, 4)), np.zeros((2, 1, 1)), [Letterbox(1, 1, 0, 0, 1, 1)], post(),
                           ["a"])
