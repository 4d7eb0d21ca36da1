"""The DCT-scaled JPEG decode leaves a trained classifier's answers as the full decode gives them: the
digits validation images scaled up to camera size and saved as JPEGs get the same top-1 from the bundle
either way (tests/perf/bench_decode.py --trained runs the same check on larger models and detectors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kiln import processing
from kiln.bundle import Bundle
from tests.perf.bench_decode import camera_jpeg, trained_agreement

WIDTH = 1024


def test_draft_decode_keeps_a_trained_classifiers_top1_on_camera_size_jpegs(digits_bundle: Path) -> None:
    spec = Bundle.load(digits_bundle).manifest.preprocess
    assert spec.decode == "draft"
    sample, _ = camera_jpeg(Image.fromarray(np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1)), mode="L"),
                            WIDTH)
    src_w, _, scale = processing.source_size(processing.decode_image(sample, spec=spec))
    assert (src_w, scale) == (WIDTH, 8.0)  # the draft path really decodes at 1/8 here

    report = trained_agreement(digits_bundle, limit=200, width=WIDTH)
    assert report["images"] == 200
    assert report["top1_agreement"] >= 0.995, report
    assert abs(float(report["top1_draft"]) - float(report["top1_full"])) <= 0.5, report  # type: ignore[arg-type]
    assert float(report["top1_full"]) > 80, report  # type: ignore[arg-type]  # a trained model, not chance

