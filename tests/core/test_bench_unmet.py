"""`kiln bench BUNDLE`: a backend or precision asked for that produced no row fails with its reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kiln.bench.sweep import BenchConfig, run_bench
from kiln.cli import main

QUICK = ["--batch", "1", "--iters", "2", "--warmup", "0", "--threads", "1"]


@pytest.fixture
def bundle(digits_bundle: Path, tmp_path: Path) -> Path:
    """The trained digits bundle: PyTorch weights only, no ONNX model, no engine."""
    return Path(shutil.copytree(digits_bundle, tmp_path / "digits"))


@pytest.mark.parametrize(("argv", "missing"), [
    (["--backend", "tensorrt"], "tensorrt fp32"),
    (["--backend", "onnxrt"], "onnxrt fp32"),
    (["--backend", "torch", "--precision", "fp32,int8"], "torch int8"),
])
def test_skipped_request_exits_2_with_reason(bundle: Path, capsys: pytest.CaptureFixture[str],
                                             argv: list[str], missing: str) -> None:
    assert main(["bench", str(bundle), *argv, *QUICK]) == 2
    captured = capsys.readouterr()
    assert "torch" in captured.out  # the baseline rows are still printed
    errors = [line for line in captured.err.splitlines() if line.startswith("kiln bench: error:")]
    assert len(errors) == 1 and f"no result for {missing}: " in errors[0]
    assert len(errors[0].split(f"{missing}: ", 1)[1]) > 5  # the reason, not an empty string


@pytest.mark.parametrize("argv", [[], ["--backend", "torch"], ["--backend", "all"]])
def test_requests_that_ran_exit_0(bundle: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """auto picks what runs; all means whichever backends run here (each precision on one at least)."""
    assert main(["bench", str(bundle), *argv, *QUICK]) == 0
    assert "kiln bench: error" not in capsys.readouterr().err


def test_report_lists_unmet_requests(bundle: Path) -> None:
    cfg = BenchConfig(backends=["all"], precisions=["fp32", "int8"], batches=[1], warmup=0, iters=1,
                      threads=1)
    (unmet,) = run_bench(bundle, cfg)["unmet"]
    assert unmet["backend"] == "all" and unmet["precision"] == "int8"
    assert "torch:" in unmet["reason"] and "onnxrt:" in unmet["reason"]
