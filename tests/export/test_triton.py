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
