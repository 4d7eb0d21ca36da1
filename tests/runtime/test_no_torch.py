"""kiln.runtime and kiln.serve import, and the ONNX Runtime path serves a bundle, with torch absent
(a serving image has only onnxruntime and/or TensorRT). A subprocess blocks torch imports."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Blocked(importlib.abc.MetaPathFinder):
        BLOCKED = ("torch", "torchvision")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ModuleNotFoundError(f"No module named '{name}' (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, _Blocked())
    """
)

PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import numpy as np

    import kiln.runtime, kiln.runtime.onnxrt, kiln.runtime.tensorrt, kiln.runtime.torch, kiln.runtime.cuda
    import kiln.serve
    serve_modules = sorted(m.name for m in pkgutil.iter_modules(kiln.serve.__path__)
                           if m.name in ("app", "batcher", "schemas", "settings"))
    for name in serve_modules:
        importlib.import_module(f"kiln.serve.{name}")

    from kiln.errors import BackendUnavailable
    backend = kiln.runtime.load(sys.argv[1])
    out = backend.infer({"images": np.zeros((2, 1, 28, 28), np.float32)})
    try:
        kiln.runtime.load(sys.argv[1], "torch")
        torch_error = None
    except BackendUnavailable as exc:
        torch_error = str(exc)
    print(json.dumps({
        "torch_loaded": "torch" in sys.modules,
        "serve_modules": serve_modules,
        "backend": backend.name,
        "shape": list(out["logits"].shape),
        "torch_error": torch_error,
        "available": kiln.runtime.available_backends()["torch"]["available"],
    }))
    """
)


def test_runtime_and_serve_import_without_torch(lenet_master: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + PROBE, str(lenet_master)],
        capture_output=True, text=True, timeout=60, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch_loaded"] is False
    assert result["backend"] == "onnxrt" and result["shape"] == [2, 10]
    assert "PyTorch is not installed" in result["torch_error"]
    assert result["available"] is False


def test_blocker_really_blocks_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr
