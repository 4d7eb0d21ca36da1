"""The comparison export verification relies on, at its edges: the shape error naming the output, empty
outputs, the tolerances passed in rather than the defaults, a top-2 tie on either side, detections
matched per class in original pixels, the cut at the detection cap, and every count in the report."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.bundle import Architecture, InputSpec, Manifest, Preprocess, TensorSpec
from kiln.compare import compare, detection_output_names, top1_agreement
from kiln.errors import ExportError
from kiln.processing import Letterbox

IDENTITY = Letterbox(1.0, 1.0, 0.0, 0.0, 64, 64)


def classify_manifest() -> Manifest:
    return Manifest(
        kiln_version="0.1.0", task="classify", classes=["a", "b", "c"],
        input=InputSpec(name="images", shape=[1, 8, 8]),
        outputs=[TensorSpec(name="logits", shape=[3])],
        preprocess=Preprocess(mode="resize", size=(8, 8), channels="L", mean=[0.5], std=[0.5]),
        architecture=Architecture(name="lenet5"),
    )


def detect_manifest(names: tuple[str, str] = ("boxes", "scores"), threshold: float = 0.3,
                    max_detections: int = 10) -> Manifest:
    return Manifest(
        kiln_version="0.1.0", task="detect", classes=["circle", "square"],
        input=InputSpec(name="images", shape=[3, 64, 64]),
        outputs=[TensorSpec(name=names[0], shape=[4, 4]), TensorSpec(name=names[1], shape=[4, 2])],
        preprocess=Preprocess(mode="letterbox", size=(64, 64), mean=[0, 0, 0], std=[1, 1, 1]),
        postprocess={"score_threshold": threshold, "iou_threshold": 0.5, "max_detections": max_detections},
        architecture=Architecture(name="kiln-det-s", args={"num_classes": 2}),
    )


FAR_APART = [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [0.0, 20.0, 10.0, 30.0],
             [20.0, 20.0, 30.0, 30.0]]


def dets(scores: list[tuple[float, float]], boxes: list[list[float]] | None = None) -> dict[str, np.ndarray]:
    """One image, four anchors far apart; ``scores`` per anchor (circle, square)."""
    return {"boxes": np.array([boxes or FAR_APART], dtype=np.float32),
            "scores": np.array([scores], dtype=np.float32)}


def counts(report: dict) -> tuple[int, int, int, int, int]:
    return report["detections"], report["matched"], report["missing"], report["extra"], report["borderline"]


# ---- raw outputs ---------------------------------------------------------------------------------


def test_shape_mismatch_names_the_output_and_both_shapes() -> None:
    with pytest.raises(ExportError,
                       match=r"output logits: shape \(2, 4\) differs from the reference \(2, 3\)"):
        compare(classify_manifest(), {"logits": np.zeros((2, 3))}, {"logits": np.zeros((2, 4))},
                [IDENTITY] * 2)


def test_no_images_compare_as_equal() -> None:
    report = compare(classify_manifest(), {"logits": np.zeros((0, 3))}, {"logits": np.zeros((0, 3))}, [])
    assert report == {"images": 0, "max_abs_diff": 0.0, "max_abs_diff_by_output": {"logits": 0.0},
                      "top1_agreement": 100.0, "top1_ties": 0}


def test_atol_given_to_compare_decides_the_ties() -> None:
    ref = np.array([[1.0, 1.25, 0.0]])
    cand = np.array([[1.25, 1.0, 0.0]])
    assert (
        compare(classify_manifest(), {"logits": ref}, {"logits": cand}, [IDENTITY])["top1_agreement"] == 0.0
    )
    loose = compare(classify_manifest(), {"logits": ref}, {"logits": cand}, [IDENTITY], atol=0.5)
    assert (loose["top1_agreement"], loose["top1_ties"]) == (100.0, 1)


# ---- top-1 agreement -------------------------------------------------------------------------------


def test_a_tie_on_the_reference_side_alone_is_left_out() -> None:
    ref = np.array([[1.0, 1.0 + 1e-6, 0.0], [3.0, 0.0, 0.0]])
    cand = np.array([[5.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert top1_agreement(ref, cand) == {"top1_agreement": 100.0, "top1_ties": 1}
    assert top1_agreement(cand, ref) == {"top1_agreement": 100.0, "top1_ties": 1}


def test_a_gap_of_exactly_atol_is_a_tie_on_either_side() -> None:
    ref = np.array([[1.0, 1.5, 0.0]])
    clear = np.array([[5.0, 0.0, 0.0]])
    assert top1_agreement(ref, clear, atol=0.5)["top1_ties"] == 1
    assert top1_agreement(clear, ref, atol=0.5)["top1_ties"] == 1
    assert top1_agreement(ref, clear, atol=0.25) == {"top1_agreement": 0.0, "top1_ties": 0}


def test_two_classes_can_tie() -> None:
    ref = np.array([[1.0, 1.0 + 1e-6], [0.0, 2.0]])
    cand = np.array([[1.0 + 1e-6, 1.0], [0.0, 2.0]])
    assert top1_agreement(ref, cand) == {"top1_agreement": 100.0, "top1_ties": 1}


def test_a_single_class_never_ties_and_always_agrees() -> None:
    assert top1_agreement(np.array([[0.3], [0.1]]), np.array([[0.2], [0.9]])) == {"top1_agreement": 100.0,
                                                                                    "top1_ties": 0}


def test_agreement_is_rounded_to_three_decimals() -> None:
    ref = np.zeros((3, 3))
    ref[:, 0] = 1.0
    cand = ref.copy()
    cand[1:, 2] = 2.0
    assert top1_agreement(ref, cand)["top1_agreement"] == 33.333


# ---- detection output names ------------------------------------------------------------------------


@pytest.mark.parametrize(("names", "expected"), [
    (("boxes", "scores"), ("boxes", "scores")),
    (("scores", "boxes"), ("boxes", "scores")),
    (("b", "s"), ("b", "s")),
    (("b", "scores"), ("b", "scores")),
    (("boxes", "s"), ("boxes", "s")),
])
def test_detection_outputs_by_name_else_by_position(names: tuple[str, str],
                                                    expected: tuple[str, str]) -> None:
    assert detection_output_names(detect_manifest(names)) == expected


def test_detections_read_from_outputs_named_in_another_order() -> None:
    manifest = detect_manifest(("scores", "boxes"))
    out = dets([(0.9, 0.1), (0.1, 0.8), (0.0, 0.0), (0.0, 0.0)])
    report = compare(manifest, out, out, [IDENTITY])
    assert counts(report) == (2, 2, 0, 0, 0)


# ---- detection matching ----------------------------------------------------------------------------


def test_box_tolerance_is_measured_in_original_pixels() -> None:
    """0.3 model-input px at letterbox scale 0.5 is 0.6 original px: over the half-pixel tolerance."""
    ref = dets([(0.9, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)])
    moved = [list(FAR_APART[0]), *FAR_APART[1:]]
    moved[0] = [v + 0.3 for v in moved[0]]
    cand = dets([(0.9, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)], moved)
    half = Letterbox(0.5, 0.5, 0.0, 0.0, 128, 128)
    assert counts(compare(detect_manifest(), ref, cand, [IDENTITY])) == (1, 1, 0, 0, 0)
    assert counts(compare(detect_manifest(), ref, cand, [half])) == (1, 0, 1, 1, 0)
    same = compare(detect_manifest(), ref, ref, [half])  # both sides mapped back the same way
    assert counts(same) == (1, 1, 0, 0, 0) and same["max_box_diff_px"] == 0.0


def test_a_box_moved_by_exactly_the_tolerance_still_matches() -> None:
    ref = dets([(0.9, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)])
    moved = [[v + 0.5 for v in FAR_APART[0]], *FAR_APART[1:]]
    report = compare(detect_manifest(), ref, dets([(0.9, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)], moved),
                     [IDENTITY])
    assert counts(report) == (1, 1, 0, 0, 0) and report["max_box_diff_px"] == 0.5


def test_worst_box_difference_is_rounded_to_four_decimals() -> None:
    ref = dets([(0.9, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)])
    moved = [[v + 0.123456 for v in FAR_APART[0]], *FAR_APART[1:]]
    report = compare(detect_manifest(), ref, dets([(0.9, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)], moved),
                     [IDENTITY])
    assert report["max_box_diff_px"] == 0.1235


def test_a_detection_of_another_class_is_passed_over_for_one_of_the_same_class() -> None:
    """The candidate's best-scoring detection is a circle elsewhere; the square after it still matches."""
    ref = dets([(0.0, 0.0), (0.0, 0.8), (0.0, 0.0), (0.0, 0.0)])
    cand = dets([(0.9, 0.0), (0.0, 0.8), (0.0, 0.0), (0.0, 0.0)])
    assert counts(compare(detect_manifest(), ref, cand, [IDENTITY])) == (1, 1, 0, 1, 0)


def test_a_missing_detection_does_not_stop_the_rest_from_matching() -> None:
    ref = dets([(0.9, 0.0), (0.0, 0.8), (0.7, 0.0), (0.0, 0.0)])
    cand = dets([(0.05, 0.0), (0.0, 0.8), (0.7, 0.0), (0.0, 0.0)])
    report = compare(detect_manifest(), ref, cand, [IDENTITY])
    assert counts(report) == (3, 2, 1, 0, 0)


def test_score_tolerance_given_to_compare_decides_borderline() -> None:
    ref = dets([(0.9, 0.0), (0.32, 0.0), (0.0, 0.0), (0.0, 0.0)])
    cand = dets([(0.9, 0.0), (0.28, 0.0), (0.0, 0.0), (0.0, 0.0)])
    assert counts(compare(detect_manifest(), ref, cand, [IDENTITY])) == (2, 1, 1, 0, 0)
    assert counts(compare(detect_manifest(), ref, cand, [IDENTITY], score_tol=0.05)) == (1, 1, 0, 0, 1)


def test_a_score_exactly_the_tolerance_from_the_threshold_is_borderline() -> None:
    ref = dets([(0.9, 0.0), (0.375, 0.0), (0.0, 0.0), (0.0, 0.0)])
    cand = dets([(0.9, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)])
    manifest = detect_manifest(threshold=0.25)
    assert counts(compare(manifest, ref, cand, [IDENTITY], score_tol=0.125)) == (1, 1, 0, 0, 1)
    assert counts(compare(manifest, ref, cand, [IDENTITY], score_tol=0.1)) == (2, 1, 1, 0, 0)


def test_rounding_at_the_detection_cap_swaps_which_detection_is_kept() -> None:
    """Two detections an ulp apart compete for the last place under max_detections: each side keeps a
    different one, and both are borderline, not missing and extra."""
    ref = dets([(0.9, 0.0), (0.8, 0.0), (0.79999, 0.0), (0.0, 0.0)])
    cand = dets([(0.9, 0.0), (0.79999, 0.0), (0.8, 0.0), (0.0, 0.0)])
    report = compare(detect_manifest(max_detections=2), ref, cand, [IDENTITY])
    assert counts(report) == (1, 1, 0, 0, 2)


def test_below_the_cap_the_lowest_kept_score_is_no_cut() -> None:
    ref = dets([(0.9, 0.0), (0.8, 0.0), (0.0, 0.0), (0.0, 0.0)])
    cand = dets([(0.9, 0.0), (0.0, 0.0), (0.8, 0.0), (0.0, 0.0)])
    assert counts(compare(detect_manifest(max_detections=3), ref, cand, [IDENTITY])) == (2, 1, 1, 1, 0)
