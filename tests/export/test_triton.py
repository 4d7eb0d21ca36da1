"""The Triton model repository: config.pbtxt parses back into Triton's ModelConfig protobuf."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess, TensorSpec
from kiln.cli import main
from kiln.export.triton import read_config


def test_triton_repo_config_parses_as_model_config(exported: Path, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    (repo / "other").mkdir(parents=True)
    assert main(["export", str(exported), "--precision", "fp16", "--batch", "2:8:16", "--triton-repo",
                 str(repo),
                 "--triton-max-delay-us", "500"]) == 0
    folder = repo / "exported"
    assert (folder / "1" / "model.onnx").read_bytes() == (exported / "model.fp16.onnx").read_bytes()
    cfg = read_config(folder / "config.pbtxt")
    assert cfg.name == "exported" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    (inp,) = cfg.input
    assert inp.name == "images" and list(inp.dims) == [1, 28, 28] and inp.data_type == 11  # TYPE_FP32
    (out,) = cfg.output
    assert out.name == "logits" and list(out.dims) == [10]
    # Labels: the classes file beside the config, named by the class output, one class per line in index
    # order.
    assert out.label_filename == "labels.txt"
    classes = (folder / "labels.txt").read_text().splitlines()
    assert classes == json.loads((exported / "kiln.json").read_text())["classes"] and len(classes) == 10
    assert (
        "raw class scores (logits, before softmax)"
        in cfg.parameters["output.logits.description"].string_value
    )
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


def test_detector_repository_states_output_semantics_and_labels(tmp_path: Path) -> None:
    from kiln.export.triton import write_triton_repo

    root = tmp_path / "shapes"
    root.mkdir()
    manifest = Manifest(kiln_version="test", task="detect", classes=["circle", "square", "triangle"],
                        input=InputSpec(name="images", shape=[3, 160, 160],
                                        batch=BatchRange(min=1, opt=4, max=8)),
                        outputs=[TensorSpec(name="boxes", shape=[336, 4]),
                                 TensorSpec(name="scores", shape=[336, 3])],
                        preprocess=Preprocess(mode="letterbox", size=(160, 160), mean=[0.5] * 3,
                                              std=[0.25] * 3),
                        postprocess={"score_threshold": 0.3, "iou_threshold": 0.45, "max_detections": 50},
                        architecture=Architecture(name="kiln-det-s"))
    (root / "model.onnx").write_bytes(b"graph bytes: the repository copies them")
    bundle = Bundle(root, manifest)
    bundle.add_artifact("model.onnx", "onnx", "fp32")
    folder = write_triton_repo(bundle, tmp_path / "repo", onnx_file="model.onnx", engine_file=None,
                               batch=BatchRange(min=1, opt=4, max=8))
    cfg = read_config(folder / "config.pbtxt")  # Triton's ModelConfig, parsed by text_format
    assert (folder / "labels.txt").read_text() == "circle\nsquare\ntriangle\n"
    assert {o.name: o.label_filename for o in cfg.output} == {"boxes": "", "scores": "labels.txt"}
    boxes = cfg.parameters["output.boxes.description"].string_value
    scores = cfg.parameters["output.scores.description"].string_value
    assert "x1, y1, x2, y2 in the letterboxed 160x160 input's pixels" in boxes and "before NMS" in boxes
    assert "per-class sigmoid scores" in scores and "IoU 0.45" in scores and "scores >= 0.3" in scores
