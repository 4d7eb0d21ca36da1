"""Property-based checks against a reference: numpy NMS vs torchvision, letterbox placement round trip,
top-k vs argsort, KServe v2 JSON tensor data round trip. Each runs a bounded number of examples.

The NMS thresholds are exact in float32: torchvision compares its float32 IoU with the threshold as a
double, kiln compares in float32, so at an IoU equal to a threshold such as 0.3 or 0.8 (3/10, 8/10 of
integer boxes) the two may decide differently; elsewhere they must agree box for box.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from kiln.bundle import ClassifyPost, Preprocess
from kiln.processing import classify_topk, nms, softmax, to_unit

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def boxes_and_scores(draw: st.DrawFn, max_boxes: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random xyxy boxes on a small grid (so overlaps, ties and duplicates happen), distinct scores
    (ties in score are ordered differently by the two implementations), and class ids."""
    n = draw(st.integers(0, max_boxes))
    xy = draw(hnp.arrays(np.int64, (n, 2), elements=st.integers(0, 20)))
    wh = draw(hnp.arrays(np.int64, (n, 2), elements=st.integers(1, 12)))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = (draw(st.permutations(list(range(n)))) if n else [])
    scores = (np.asarray(scores, np.float32) + 1.0) / (n + 1.0)
    classes = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 2)))
    return boxes, scores, classes


@PROPERTY
@given(data=boxes_and_scores(), iou=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
def test_nms_matches_torchvision(data: tuple[np.ndarray, np.ndarray, np.ndarray], iou: float) -> None:
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    boxes, scores, _ = data
    ours = nms(boxes, scores, iou)
    theirs = ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
    assert ours.tolist() == theirs.tolist()


@PROPERTY
@given(data=boxes_and_scores(), iou=st.sampled_from([0.125, 0.5, 0.75]))
def test_per_class_nms_matches_torchvision_batched_nms(data: tuple[np.ndarray, np.ndarray, np.ndarray],
                                                      iou: float) -> None:
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    boxes, scores, classes = data
    kept = [
        np.flatnonzero(classes == c)[nms(boxes[classes == c], scores[classes == c], iou)]
        for c in np.unique(classes)
    ]
    ours = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    ours = ours[np.argsort(-scores[ours], kind="stable")]
    theirs = ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes),
                             iou).numpy()
    assert ours.tolist() == theirs.tolist()


@PROPERTY
@given(
    width=st.integers(1, 400), height=st.integers(1, 400),
    size=st.tuples(st.integers(8, 96), st.integers(8, 96)),
    box=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)
def test_letterbox_then_back_is_the_identity(width: int, height: int, size: tuple[int, int],
                                             box: tuple[float, float, float, float]) -> None:
    spec = Preprocess(mode="letterbox", size=size, channels="RGB", mean=[0, 0, 0], std=[1, 1, 1])
    arr, lb = to_unit(Image.new("RGB", (width, height), (255, 255, 255)), spec)
    assert arr.shape == (3, *size)
    # the image fills the input on one side at least, centred on the other
    nw, nh = round(width * lb.scale_x), round(height * lb.scale_y)
    assert lb.pad_x == (size[1] - nw) // 2 and lb.pad_y == (size[0] - nh) // 2
    assert nw == size[1] or nh == size[0]
    x1, x2 = sorted((box[0] * width, box[2] * width))
    y1, y2 = sorted((box[1] * height, box[3] * height))
    original = np.array([[x1, y1, x2, y2]], np.float64)
    placed = original * [lb.scale_x, lb.scale_y, lb.scale_x, lb.scale_y] + [
        lb.pad_x,
        lb.pad_y,
        lb.pad_x,
        lb.pad_y,
    ]
    back = lb.to_original(placed.astype(np.float32))
    np.testing.assert_allclose(back, original, atol=1e-3 * max(width, height, 1))
    # the whole placed image maps back to the whole original image
    full = np.array([[lb.pad_x, lb.pad_y, lb.pad_x + nw, lb.pad_y + nh]], np.float32)
    np.testing.assert_allclose(lb.to_original(full), [[0, 0, width, height]], atol=1e-3 * max(width, height))


@PROPERTY
@given(
    logits=hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 20)),
                      elements=st.floats(-30, 30, width=32)),
    k=st.integers(1, 25),
)
def test_topk_agrees_with_argsort(logits: np.ndarray, k: int) -> None:
    classes = [f"c{i}" for i in range(logits.shape[1])]
    ranked = classify_topk(logits, classes, ClassifyPost(top_k=k))
    probs = softmax(logits)
    order = np.argsort(-probs, axis=1, kind="stable")[:, : min(k, logits.shape[1])]
    for row, expected, p in zip(ranked, order, probs, strict=True):
        assert [r["index"] for r in row] == expected.tolist()
        assert [r["label"] for r in row] == [classes[j] for j in expected]
        scores = [r["score"] for r in row]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, p[expected], rtol=1e-6)


@PROPERTY
@given(arr=hnp.arrays(st.sampled_from([np.float32, np.float16, np.int64, np.int32, np.uint8]),
                      hnp.array_shapes(min_dims=1, max_dims=4, max_side=5)))
def test_v2_json_tensor_data_round_trips(arr: np.ndarray) -> None:
    """What the server writes (``ravel().tolist()``) and reads back (:func:`parse_tensor`) is the array."""
    from kiln.serve.numeric import parse_tensor

    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=-1.0)
    datatype = {"f4": "FP32", "f2": "FP16", "i8": "INT64", "i4": "INT32", "u1": "UINT8"}[arr.dtype.str[1:]]
    for data in (arr.ravel().tolist(), arr.tolist()):
        back = parse_tensor("x", data, datatype, arr.dtype).reshape(arr.shape)
        assert back.dtype == arr.dtype
        np.testing.assert_array_equal(back, arr)
