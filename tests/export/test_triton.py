"""The Triton model repository: config.pbtxt parses back into Triton's ModelConfig protobuf."""

from __future__ import annotations

from pathlib import Path

from kiln.cli import main
from kiln.export.triton import read_config


def test_triton_repo_config_parses_as_model_config(exported: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "other").mkdir(parents=True)
    assert main(["export", str(exported), "--precision", "fp16", "--batch", "2:8:16", "--triton-repo", str(repo),
                 "--triton-max-delay-us", "500"]) == 0
    folder = repo / "exported"
    assert (folder / "1" / "model.onnx").read_bytes() == (exported / "model.fp16.onnx").read_bytes()
    cfg = read_config(folder / "config.pbtxt")
    assert cfg.name == "exported" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    (inp,) = cfg.input
    assert inp.name == "images" and list(inp.dims) == [1, 28, 28] and inp.data_type == 11  # TYPE_FP32
    (out,) = cfg.output
    assert out.name == "logits" and list(out.dims) == [10]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].count == 1
    assert (repo / "other").is_dir()  # other models in the repository are left alone


def test_engine_with_profile_min_above_one_is_refused(tmp_path: Path) -> None:
    import pytest

    from kiln.bundle import BatchRange
    from kiln.errors import ExportError
    from kiln.export.triton import write_triton_repo

    with pytest.raises(ExportError, match="batch range starting at 1"):
        write_triton_repo(None, tmp_path / "repo", onnx_file="model.onnx",  # type: ignore[arg-type]
                          engine_file="model.fp16.engine", batch=BatchRange.parse("4:8:32"))
    assert not (tmp_path / "repo").exists()
