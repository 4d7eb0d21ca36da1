"""Export matrix over torchvision and timm architectures (slow; ``make test-slow``).

Each architecture, random-initialized at its native input size with the preprocessing of its
pretrained weights, goes through ``kiln export --precision fp32,fp16,int8``: the fp32 ONNX verified
against PyTorch, a float16 ONNX, INT8 calibrated within an accuracy budget on a small synthetic
image set; then ONNX Runtime CPU latency at batch 1 is measured. A failing architecture fails its
own test with the stage and the reason; the rows are also written to ``$KILN_MATRIX_OUT`` (JSON lines)
when set. Run one architecture with ``-k resnet18``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ARCHS = ["resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
         "regnet_y_400mf",
         "convnext_tiny", "vit_b_16", "timm:vit_tiny_patch16_224", "timm:efficientnet_b0"]
CLASSES = ["dots", "stripes"]  # sorted, as the folder reader names classes
# A random-init model's top-1 on two classes is a coin toss that INT8 may flip for a few images: the
# budget checks that calibration runs end to end and keeps the model's answers, not its skill.
BUDGET_POINTS = 25.0


def _synthetic_folder(root: Path, per_class: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 60, size=(96, 128, 3), dtype=np.uint8)
            if name == "stripes":
                arr[:, ::8] = 230
            else:
                arr[::10, ::10] = 230
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def _bundle(arch: str, data: Path, root: Path) -> Any:
    import torch

    from kiln.bundle import Architecture, Bundle, InputSpec, Manifest, TensorSpec
    from kiln.models import build_model
    from kiln.models.pretrained import (
        TIMM_PREFIX,
        timm_preprocess,
        torchvision_preprocess,
        torchvision_weights,
    )

    pre = (
        timm_preprocess(arch)
        if arch.startswith(TIMM_PREFIX)
        else torchvision_preprocess(torchvision_weights(arch))
    )
    spec = Architecture(name=arch,
                        args={"num_classes": len(CLASSES), "in_channels": 3, "image_size": pre.size[0]})
    torch.manual_seed(0)
    model = build_model(spec).eval()
    root.mkdir(parents=True)
    torch.save(model.state_dict(), root / "model.pt")
    bundle = Bundle(root, Manifest(
        kiln_version="0.1.0", task="classify", classes=CLASSES,
        input=InputSpec(name="images", shape=[3, *pre.size], batch={"min": 1, "opt": 1, "max": 4}),
        outputs=[TensorSpec(name="logits", shape=[len(CLASSES)])], preprocess=pre, postprocess={"top_k": 1},
        architecture=spec, training={"data": f"folder:{data}", "val_fraction": 0.5, "seed": 0}))
    bundle.add_artifact("model.pt", "torch")  # what exported graphs name as their source
    bundle.save()
    return bundle


def _latency_ms(path: Path, shape: list[int], runs: int = 20) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the machine is shared: one thread gives comparable numbers
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.zeros((1, *shape), dtype=np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_matrix(arch: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if arch.startswith("timm:"):
        pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    from kiln.bundle import Bundle
    from kiln.cli import main

    bundle = _bundle(arch, _synthetic_folder(tmp_path / "data"), tmp_path / "bundle")
    row: dict[str, Any] = {"arch": arch, "size": list(bundle.manifest.preprocess.size)}
    code = main(["export", str(bundle.root), "--precision", "fp32,fp16,int8", "--batch", "1:1:4", "--json",
                 "--calib-images", "16", "--calib-eval-images", "12", "--max-accuracy-drop",
                 str(BUDGET_POINTS)])
    out = capsys.readouterr()
    done = Bundle.load(bundle.root)
    row["artifacts"] = {f"{a.format}/{a.precision}": a.metrics for a in done.manifest.artifacts.values()
                        if a.format == "onnx"}
    failed = [p for p in ("fp32", "fp16", "int8") if done.artifact("onnx", p) is None]
    if code == 0 and not failed:
        fp32 = done.verify_artifact(done.artifact("onnx", "fp32"))  # type: ignore[arg-type]
        row["ort_cpu_ms_b1"] = round(_latency_ms(fp32, done.manifest.input.shape), 2)
    else:
        row["failed"] = failed or ["export"]
        row["reason"] = (out.err.strip().splitlines() or ["no message"])[-1]
    if os.environ.get("KILN_MATRIX_OUT"):
        with open(os.environ["KILN_MATRIX_OUT"], "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str))
    assert code == 0 and not failed, f"{arch}: {', '.join(row['failed'])} failed: {row['reason']}"
