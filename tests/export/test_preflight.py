"""Export fails fast and in one line: a damaged ONNX file, TensorRT or a GPU missing for --engine; and
temporary files of a killed export are removed by the next run on the bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.errors import BackendUnavailable
from kiln.export import pipeline
from kiln.fsutil import atomic_path, remove_stale_temps, sha256_file


def corrupt_fp32(bundle: Path) -> None:
    """Damage model.onnx and record the damaged file's sha256, so only reading it can tell."""
    data = (bundle / "model.onnx").read_bytes()
    (bundle / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\xff" + data[100:3000])
    manifest = json.loads((bundle / "kiln.json").read_text())
    manifest["artifacts"]["model.onnx"]["sha256"] = sha256_file(bundle / "model.onnx")
    (bundle / "kiln.json").write_text(json.dumps(manifest))


def no_work(*_a: object, **_k: object) -> None:
    raise AssertionError("the export started working before its requirements were checked")


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_damaged_onnx_is_one_line_error(exported: Path, capsys: pytest.CaptureFixture[str],
                                        precision: str) -> None:
    target = exported / f"model.{precision}.onnx"
    before = target.read_bytes() if target.exists() else None  # the fixture has an fp16 graph already
    corrupt_fp32(exported)
    assert main(["export", str(exported), "--precision", precision, "--calib-images", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("kiln export: error: cannot read") and "model.onnx" in err[0]
    assert "DecodeError" in err[0] and f"kiln export {exported} --precision fp32" in err[0]
    assert (target.read_bytes() if target.exists() else None) == before


def test_onnx_library_errors_become_export_errors(tmp_path: Path) -> None:
    from kiln.calib.onnxfile import OnnxFileError, load_onnx, onnx_errors

    (tmp_path / "m.onnx").write_bytes(b"\x0a\xff\xff\xff\xff garbage")
    with pytest.raises(OnnxFileError, match=r"cannot read .*m\.onnx \(DecodeError"):
        load_onnx(tmp_path / "m.onnx")
    import onnxruntime as ort

    with pytest.raises(OnnxFileError, match="onnx/onnxruntime failed"), onnx_errors():
        ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with pytest.raises(ZeroDivisionError), onnx_errors():  # kiln's own bugs keep their traceback
        _ = 1 / 0


def test_engine_without_tensorrt_fails_before_any_work(exported: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.runtime import tensorrt

    def missing() -> int:
        raise BackendUnavailable("TensorRT is not installed (No module named 'tensorrt'): "
                                 f"{tensorrt.INSTALL_HINT}")

    monkeypatch.setattr(tensorrt, "import_tensorrt", missing)
    for step in ("export_fp32", "export_fp16", "export_int8", "build_engines"):
        monkeypatch.setattr(pipeline, step, no_work)
    start = time.perf_counter()
    assert main(["export", str(exported), "--precision", "fp32,fp16", "--engine"]) == 2
    assert time.perf_counter() - start < 5
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--engine: TensorRT is not installed" in line
    assert "pip install '.[trt]' from the kiln checkout" in line and "kiln-vision[trt]" in line
    assert "kiln[trt]" not in line


def test_engine_without_gpu_fails_before_any_work(exported: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.runtime import cuda, tensorrt

    monkeypatch.setattr(tensorrt, "import_tensorrt", lambda: 10)
    monkeypatch.setattr(cuda, "no_gpu_reason", lambda: "no CUDA device is visible")
    monkeypatch.setattr(pipeline, "export_fp32", no_work)
    assert main(["export", str(exported), "--precision", "fp32", "--engine"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "needs an NVIDIA GPU" in line and "no CUDA device is visible" in line


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    old = time.time() - 3600
    legacy = tmp_path / ".model.onnx.k3j_9x2a.tmp"  # a name without pid, from before this process
    killed = tmp_path / f".model.int8.onnx.{dead_pid()}-abcd1234.tmp"
    killed_data = tmp_path / f".model.onnx.{dead_pid()}-zz00yy11.tmp.data"
    reused = tmp_path / f".kiln.json.{os.getpid()}-q1w2e3r4.tmp"  # our pid, but older than us: pid reuse
    nested = tmp_path / ".cache" / "calib" / "k" / ".trials.json.b8c7d6e5.tmp"
    nested.parent.mkdir(parents=True)
    for p in (legacy, killed, killed_data, reused, nested):
        p.write_bytes(b"")
        os.utime(p, (old, old))
    ours = tmp_path / f".model.fp16.onnx.{os.getpid()}-live0000.tmp"  # being written by this process
    fresh_legacy = tmp_path / ".model.onnx.new00000.tmp"  # pid-less but newer than this process
    others = [tmp_path / "notes.tmp", tmp_path / ".editor.tmp", tmp_path / "model.onnx"]
    for p in (ours, fresh_legacy, *others):
        p.write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([legacy, killed, killed_data, reused, nested])
    assert all(p.exists() for p in (ours, fresh_legacy, *others))


def test_atomic_path_names_carry_the_pid(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "model.onnx") as tmp:
        assert tmp.name.startswith(f".model.onnx.{os.getpid()}-") and tmp.name.endswith(".tmp")
        assert remove_stale_temps(tmp_path) == []  # in use by a live process: kept
        tmp.write_bytes(b"graph")
    assert (tmp_path / "model.onnx").read_bytes() == b"graph"


def test_next_export_removes_a_killed_runs_temp_files(exported: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    leftover = exported / f".model.int8.onnx.{dead_pid()}-abcd1234.tmp"
    leftover.write_bytes(b"")
    corrupt_fp32(exported)  # the run then stops early; the cleanup comes first
    assert main(["export", str(exported), "--precision", "int8"]) == 2
    assert not leftover.exists()
