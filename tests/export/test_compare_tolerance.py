"""The tolerance fp32 verification judges by: absolute + relative to each image's output scale, per output
and element by element (as Polygraphy's simple comparator, the relative part against the scale), ties
at twice the image's tolerance, and the top-k set agreement."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compare import Tolerance, compare, output_errors, topk_agreement, topk_for
from kiln.errors import ConfigError

from .test_compare_outputs import IDENTITY, classify_manifest


def test_the_bound_grows_with_each_image_scale() -> None:
    ref = np.array([[3.0, -400.0, 1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(Tolerance(1e-4, 1e-5).bound(ref), [1e-4 + 4e-3, 1e-4])


def test_output_errors_count_values_out_of_tolerance() -> None:
    ref = np.array([[100.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    cand = ref.copy()
    cand[0, 2] += 1e-3  # within 1e-4 + 1e-5 x 100 = 1.1e-3
    cand[1, 1] += 2e-4  # over 1e-4 + 1e-5 x 1
    out = output_errors(ref, cand, Tolerance(1e-4, 1e-5))
    assert (out["mismatches"], out["values"], out["passed"]) == (1, 6, False)
    assert out["max_abs_diff"] == pytest.approx(1e-3) and out["scale"] == 100.0
    assert out["max_rel_diff"] == pytest.approx(2e-4) and out["mean_abs_diff"] == pytest.approx(1.2e-3 / 6)


def test_nan_and_inf_are_mismatches() -> None:
    ref = np.ones((1, 4))
    cand = np.array([[np.nan, np.inf, 1.0, 1.0]])
    assert output_errors(ref, cand, Tolerance())["mismatches"] == 2


def test_no_values_pass() -> None:
    assert output_errors(np.zeros((0, 3)), np.zeros((0, 3)), Tolerance())["passed"] is True


def test_negative_tolerances_are_refused() -> None:
    with pytest.raises(ConfigError, match="atol and rtol >= 0"):
        Tolerance(-1e-4, 1e-5)


def test_topk_set_order_inside_does_not_matter_but_a_new_member_does() -> None:
    ref = np.array([[9.0, 8.0, 7.0, 1.0], [9.0, 8.0, 7.0, 1.0]])
    cand = np.array([[7.0, 8.0, 9.0, 1.0], [9.0, 8.0, 1.0, 7.0]])  # same set reordered; class 3 replaces 2
    assert topk_agreement(ref, cand, 3) == {"top_k": 3, "topk_agreement": 50.0, "topk_ties": 0}


def test_topk_tie_at_the_kth_place_is_left_out() -> None:
    ref = np.array([[9.0, 8.0, 7.0, 7.0 - 1e-6], [9.0, 8.0, 7.0, 1.0]])
    cand = np.array([[9.0, 8.0, 7.0 - 2e-6, 7.0], [9.0, 8.0, 7.0, 1.0]])
    assert topk_agreement(ref, cand, 3, tie=1e-5) == {"top_k": 3, "topk_agreement": 100.0, "topk_ties": 1}
    assert topk_agreement(ref, cand, 3, tie=1e-7)["topk_agreement"] == 50.0


def test_k_stays_below_the_number_of_classes() -> None:
    assert topk_for(classify_manifest()) == 2  # three classes: the top-3 set is every class


def test_compare_with_a_tolerance_ties_at_twice_the_image_bound() -> None:
    """Each of two logits may move by the bound, so a gap up to twice it can flip by rounding alone."""
    tol = Tolerance(1e-4, 1e-5)
    bound = 1e-4 + 1e-5 * 100.0
    ref = np.array([[100.0, 100.0 - 1.9 * bound, 0.0], [100.0, 100.0 - 2.1 * bound, 0.0]])
    cand = ref[:, [1, 0, 2]]  # both top-1s flip
    report = compare(classify_manifest(), {"logits": ref}, {"logits": cand}, [IDENTITY] * 2, tolerance=tol)
    assert (report["top1_agreement"], report["top1_ties"]) == (0.0, 1)
    assert report["outputs"]["logits"]["mismatches"] == 4 and report["top_k"] == 2


def test_compare_without_a_tolerance_has_no_per_output_verdict() -> None:
    ref = np.eye(3)
    report = compare(classify_manifest(), {"logits": ref}, {"logits": ref}, [IDENTITY] * 3)
    assert "outputs" not in report and "topk_agreement" not in report
