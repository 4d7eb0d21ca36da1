import json
import shutil
from pathlib import Path

import pytest

from kiln.bundle import Bundle
from kiln.cli import main


def test_eval_writes_reference_and_reports(digits_bundle: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "b"
    shutil.copytree(digits_bundle, run)
    assert main(["eval", str(run), "--json", "--no-table"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["metrics"]
    assert m["images"] == m["count"] > 300
    assert 85 < m["top1"] <= m["top5"] <= 100 and len(m["per_class"]) == 10
    ref = Bundle.load(run).manifest.evaluation["fp32"]
    assert ref["top1"] == m["top1"] and ref["backend"] == "torch"
    rows = (run / "confusion.csv").read_text().splitlines()
    assert len(rows) == 11 and sum(int(v) for r in rows[1:] for v in r.split(",")[1:]) == m["count"]
    assert (run / "confusion.png").stat().st_size > 1000 and (run / "per_class.csv").is_file()
    # the same numbers as the training loop measured on the same split
    assert abs(m["top1"] - Bundle.load(run).manifest.artifacts["model.pt"].metrics["top1"]) < 1e-6


def test_eval_rejects_dataset_with_other_classes(digits_bundle: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "f" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), i * 40).save(tmp_path / "f" / c / f"{i}.png")
    run = Path(shutil.copytree(digits_bundle, tmp_path / "b"))  # eval records its results in the bundle
    assert main(["eval", str(run), "--data", f"folder:{tmp_path / 'f'}"]) == 2
    err = capsys.readouterr().err
    assert "classes" in err and len(err.strip().splitlines()) == 1


def test_eval_on_a_folder_that_is_not_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a kiln bundle" in capsys.readouterr().err


def test_detection_controls_on_a_classifier_are_refused(digits_bundle: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from kiln.cli import main

    bundle = shutil.copytree(digits_bundle, tmp_path / "b")
    assert main(["eval", str(bundle), "--conf", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kiln eval: error: --conf applies to detection; this bundle classifies"], err
