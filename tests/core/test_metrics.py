"""Classification metrics: the confusion matrix is indexed ``[true, predicted]`` and per-class accuracy
is each true class's share of correct predictions (recall), not each predicted class's (precision)."""

from __future__ import annotations

import numpy as np

from kiln.metrics import classification_metrics


def _logits(pred: list[int], num_classes: int) -> np.ndarray:
    out = np.zeros((len(pred), num_classes), np.float32)
    out[np.arange(len(pred)), pred] = 1.0
    return out


def test_confusion_rows_are_true_labels() -> None:
    # two images of class 0 (one predicted 1), three of class 1 (all right), none of class 2
    labels = np.array([0, 0, 1, 1, 1])
    m = classification_metrics(_logits([0, 1, 1, 1, 1], 3), labels, 3)
    assert m["confusion"].tolist() == [[1, 1, 0], [0, 3, 0], [0, 0, 0]]
    assert m["confusion"].sum(1).tolist() == np.bincount(labels, minlength=3).tolist()
    assert m["top1"] == 80.0 and m["count"] == 5


def test_per_class_accuracy_is_the_share_of_each_true_class_predicted_right() -> None:
    # class 0: 1 of 2 right; class 1: 3 of 3 (of the 4 predicted 1, one is a 0); class 2: no images
    m = classification_metrics(_logits([0, 1, 1, 1, 1], 3), np.array([0, 0, 1, 1, 1]), 3)
    np.testing.assert_allclose(m["per_class"], [50.0, 100.0, 0.0])
