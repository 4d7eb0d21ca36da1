"""`kiln bench BUNDLE`: a short real run on a tiny bundle, its table, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.bench.report import engine_table, plot_engine, render_table
from kiln.bench.sweep import BenchConfig, make_inputs, run_bench, short_reason
from kiln.bundle import Bundle
from kiln.cli import main
from kiln.errors import ConfigError


@pytest.fixture(scope="module")
def report(tiny_bundle: Path) -> dict[str, Any]:
    cfg = BenchConfig(backends=["onnxrt", "torch"], precisions=["fp32", "int8"], batches=[1, 2], warmup=2,
                      iters=5, threads=1)
    return run_bench(tiny_bundle, cfg)


def _row(report: dict[str, Any], backend: str, precision: str, batch: int) -> dict[str, Any]:
    return next(r for r in report["results"]
                if (r["backend"], r["precision"], r["batch"]) == (backend, precision, batch))


def test_every_combination_is_measured_or_skipped_with_a_reason(report: dict[str, Any]) -> None:
    for batch in (1, 2):
        base = _row(report, "torch", "fp32", batch)
        assert base["status"] == "ok" and base["baseline"] and base["speedup"] == pytest.approx(1.0)
        ort = _row(report, "onnxrt", "fp32", batch)
        assert ort["status"] == "ok" and ort["device"] == "cpu" and ort["artifact"] == "model.onnx"
        lat = ort["latency_ms"]
        assert lat["count"] == 5 == len(ort["samples_ms"])
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert ort["throughput"] == pytest.approx(batch * 5 / (sum(ort["samples_ms"]) / 1000), rel=1e-3)
        assert ort["speedup"] == pytest.approx(ort["throughput"] / base["throughput"])
        assert ort["speedup_p50"] == pytest.approx(base["latency_ms"]["p50"] / ort["latency_ms"]["p50"])
        int8 = _row(report, "onnxrt", "int8", batch)
        assert int8["status"] == "skipped" and "int8" in int8["reason"]
        assert "The bundle has" not in int8["reason"]
        assert _row(report, "torch", "int8", batch)["status"] == "skipped"
    # torch fp32 was asked for, so it is measured once per batch, not twice as baseline and as a combination.
    assert sum(1 for r in report["results"] if r["backend"] == "torch" and r["precision"] == "fp32") == 2


def test_report_has_environment_and_config(report: dict[str, Any]) -> None:
    env = report["environment"]
    assert env["cpu"] and env["cpu_count"] >= 1
    assert {"kiln", "numpy", "torch", "onnxruntime"} <= set(env["versions"])
    assert report["config"]["batches"] == [1, 2]
    assert report["config"]["inputs"].startswith("random normal")
    json.dumps(report)  # serializable as is


def test_table_lists_rows_and_skips_once(report: dict[str, Any]) -> None:
    header, rows, notes = engine_table(report)
    assert header[:4] == ["backend", "precision", "device", "batch"]
    assert len(rows) == 4
    assert sum("skipped onnxrt int8" in n for n in notes) == 1
    text = render_table("title", header, rows, notes, use_rich=False)
    lines = text.splitlines()
    assert lines[0] == "title" and "p99 ms" in lines[1] and "1.00x (ref)" in text
    assert len({len(line) for line in lines[1:7]}) == 1  # columns aligned


def test_plot_writes_a_png(report: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "bench.png"
    plot_engine(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_real_images_go_through_the_bundle_preprocessing(tiny_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (40, 30), 255).save(tmp_path / "white.png")
    bundle = Bundle.load(tiny_bundle)
    feeds = make_inputs(bundle, 3, BenchConfig(images=str(tmp_path)))
    x = feeds["images"]
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32
    assert np.allclose(x, 1.0)  # (1 - 0.5) / 0.5
    rnd = make_inputs(bundle, 2, BenchConfig())["images"]
    assert rnd.shape == (2, 1, 28, 28) and 0.5 < rnd.std() < 1.5


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="exactly one of --iters and --duration"):
        BenchConfig(iters=None, duration=None)
    with pytest.raises(ConfigError, match="unknown backend"):
        BenchConfig(backends=["tflite"])
    assert BenchConfig(backends=["all", "torch"]).combos() == [
        ("tensorrt", "fp32"),
        ("onnxrt", "fp32"),
        ("torch", "fp32"),
    ]


def test_short_reason() -> None:
    msg = ("no backend can run int8 /b: onnxrt: the bundle has no int8 ONNX model (it has: onnx fp32). "
           "The bundle has: model.onnx (onnx fp32)")
    assert short_reason(msg, "onnxrt") == "the bundle has no int8 ONNX model (it has: onnx fp32)"
    assert short_reason("something else", "onnxrt") == "something else"


def test_cli_engine_mode(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    code = main(["bench", str(tiny_bundle), "--batch", "1", "--duration", "0.2",
                 "--warmup", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "onnxrt" in text and "torch" in text and "(baseline)" in text
    data = json.loads(out.read_text())
    rows = {(r["backend"], r["batch"]): r for r in data["results"]}
    assert rows[("onnxrt", 1)]["latency_ms"]["count"] >= 1
    assert rows[("onnxrt", 1)]["requested"] == "auto"  # the default --backend: load() picked ONNX Runtime
    assert data["config"]["duration_s"] == 0.2 and data["config"]["iters"] is None


@pytest.mark.parametrize("argv, message", [
    (["bench"], "give a BUNDLE"),
    (["bench", "x", "--iters", "3", "--duration", "1"], "either --iters or --duration"),
    (["bench", "x", "--concurrency", "4"], "server-mode option"),
    (["bench", "x", "--url", "http://127.0.0.1:1"], "not both"),
    (["bench", "--url", "http://127.0.0.1:1", "--model", "m", "--plot", "p.png"], "engine-mode option"),
    (["bench", "/nonexistent/bundle"], "bundle folder not found"),
])
def test_cli_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


class _PhasedBackend:
    """Stands in for the TensorRT backend: it reports per-phase times of the last call like trtexec."""

    name, device, precision, min_batch, max_batch = "tensorrt", "cuda:0", "fp16", 1, 8

    def __init__(self) -> None:
        self.calls = 0
        self.last_timings: dict[str, float] = {}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        self.last_timings = {"h2d_ms": 0.1 * self.calls, "compute_ms": 1.0, "d2h_ms": 0.05, "total_ms": 2.0}
        return {"logits": np.zeros((1, 3), np.float32)}


def test_phase_timings_are_collected_per_call() -> None:
    from kiln.bench import time_backend
    from kiln.bench.stats import summarize

    backend = _PhasedBackend()
    samples, phases, wall, timer = time_backend(backend, {"images": np.zeros((1, 1, 28, 28), np.float32)},
                                                warmup=2, iters=4, duration=None)
    assert backend.calls == 6 and len(samples) == 4 and timer == "perf_counter" and wall > 0
    assert phases["h2d"] == pytest.approx([0.3, 0.4, 0.5, 0.6])  # warm-up calls are not recorded
    assert phases["compute"] == [1.0] * 4 and phases["d2h"] == [0.05] * 4
    report = {"results": [{"backend": "tensorrt", "precision": "fp16", "batch": 1, "status": "ok",
                           "device": "cuda:0",
                           "latency_ms": summarize(samples), "throughput": 1.0, "speedup": 2.0,
                           "phases_ms": {k: summarize(v) for k, v in phases.items()}}]}
    _, rows, notes = engine_table(report)
    assert rows[0][-1] == "2.00x"
    assert notes == ["tensorrt fp16 batch 1 phases (p50 ms): h2d 0.45, compute 1, d2h 0.05"]
