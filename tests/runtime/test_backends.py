"""The ONNX Runtime and PyTorch backends on the synthetic lenet5 bundle: agreement, input checks,
options, lifecycle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.errors import BackendUnavailable, ConfigError, InputError
from kiln.runtime import BackendClosed, OnnxRuntimeBackend, TorchBackend, load


@pytest.fixture(scope="module")
def backends(lenet_master: Path):
    ort_b = load(lenet_master, "onnxrt", threads=1)
    torch_b = load(lenet_master, "torch")
    yield ort_b, torch_b
    ort_b.close()
    torch_b.close()


def test_onnxrt_and_torch_agree(backends, images: np.ndarray) -> None:
    ort_b, torch_b = backends
    assert isinstance(ort_b, OnnxRuntimeBackend) and isinstance(torch_b, TorchBackend)
    a = ort_b.infer({"images": images})
    b = torch_b.infer({"images": images})
    assert set(a) == set(b) == {"logits"}
    assert a["logits"].shape == b["logits"].shape == (3, 10)
    assert a["logits"].dtype == b["logits"].dtype == np.float32
    np.testing.assert_allclose(a["logits"], b["logits"], atol=1e-4, rtol=0)
    # The models are not trivial: different images give different logits.
    assert np.abs(a["logits"][0] - a["logits"][1]).max() > 1e-3


def test_detector_outputs_follow_the_manifest(det_master: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with load(det_master, "onnxrt") as ort_b, load(det_master, "torch") as torch_b:
        names = [o.name for o in ort_b.outputs]
        assert names == ["boxes", "scores"]
        a, b = ort_b.infer({"images": x}), torch_b.infer({"images": x})
    assert list(a) == list(b) == names
    for spec in ort_b.outputs:
        assert a[spec.name].shape == (2, *spec.shape)
        np.testing.assert_allclose(a[spec.name], b[spec.name], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("which", [0, 1], ids=["onnxrt", "torch"])
def test_outputs_belong_to_the_caller(backends, images: np.ndarray, which: int) -> None:
    backend = backends[which]
    first = backend.infer({"images": images})["logits"]
    kept = first.copy()
    backend.infer({"images": images[::-1].copy()})
    np.testing.assert_array_equal(first, kept)
    first[:] = 0  # writable, and writing to it must not disturb the next call
    np.testing.assert_allclose(backend.infer({"images": images})["logits"], kept, atol=1e-6)


@pytest.mark.parametrize(
    ("feeds", "expected"),
    [
        ({"pixels": np.zeros((1, 1, 28, 28), np.float32)}, r"received \['pixels'\] \| expected \['images'\]"),
        ({"images": np.zeros((1, 1, 28, 28), np.float64)},
         r"images \| received dtype float64 \| expected float32"),
        ({"images": np.zeros((1, 28, 28), np.float32)}, r"images \| received rank 3"),
        ({"images": np.zeros((1, 3, 28, 28), np.float32)}, r"images \| received shape \(1, 3, 28, 28\)"),
        ({"images": np.zeros((9, 1, 28, 28), np.float32)},
         r"images \| received batch 9 \| expected a batch in \[1, 8\]"),
        ({"images": np.zeros((0, 1, 28, 28), np.float32)}, r"images \| received batch 0"),
        ({"images": [[0.0]]}, r"images \| received list"),
    ],
    ids=["name", "dtype", "rank", "shape", "batch-over", "batch-zero", "not-array"],
)
@pytest.mark.parametrize("which", [0, 1], ids=["onnxrt", "torch"])
def test_input_errors_name_the_tensor(backends, feeds, expected: str, which: int) -> None:
    with pytest.raises(InputError, match=expected):
        backends[which].infer(feeds)


def test_max_batch_override_and_describe(lenet_master: Path, images: np.ndarray) -> None:
    with load(lenet_master, "onnxrt", max_batch=2) as b:
        assert (b.min_batch, b.max_batch) == (1, 2)
        with pytest.raises(InputError, match=r"expected a batch in \[1, 2\]"):
            b.infer({"images": images})
        info = b.describe()
        assert info["backend"] == "onnxrt" and info["precision"] == "fp32" and info["device"] == "cpu"
        assert info["artifact"] == "model.onnx" and info["batch"] == {"min": 1, "max": 2}
    with pytest.raises(ConfigError, match="max_batch must be a positive integer"):
        load(lenet_master, "torch", max_batch=0)


def test_onnxrt_options(lenet_master: Path, images: np.ndarray) -> None:
    with load(lenet_master, "onnxrt", threads=1, inter_op_threads=1, optimization="basic") as b:
        assert b.infer({"images": images})["logits"].shape == (3, 10)
    with pytest.raises(ConfigError, match="unknown level 'fast'. Valid: disable, basic, extended, all"):
        load(lenet_master, "onnxrt", optimization="fast")
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        load(lenet_master, "onnxrt", threads=0)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) compile for backend onnxrt"):
        load(lenet_master, "onnxrt", compile=True)
    with pytest.raises(BackendUnavailable, match="device cuda requested"):
        load(lenet_master, "onnxrt", device="cuda")


def test_torch_precisions_on_cpu(lenet_master: Path, images: np.ndarray, backends) -> None:
    reference = backends[1].infer({"images": images})["logits"]
    with load(lenet_master, "torch", precision="bf16", device="cpu") as b:
        assert b.precision == "bf16"
        out = b.infer({"images": images})["logits"]
    assert out.dtype == np.float32  # autocast computes in bf16, the output keeps the manifest's dtype
    np.testing.assert_allclose(out, reference, atol=0.1)
    with pytest.raises(BackendUnavailable, match="fp16 autocast needs CUDA"):
        load(lenet_master, "torch", precision="fp16")
    with pytest.raises(BackendUnavailable, match="cuda_graphs needs CUDA"):
        load(lenet_master, "torch", cuda_graphs=True)
    with pytest.raises(ConfigError, match="unknown mode 'turbo'"):
        load(lenet_master, "torch", compile="turbo")


def test_closed_backend_refuses(lenet_master: Path, images: np.ndarray) -> None:
    b = load(lenet_master, "onnxrt")
    b.close()
    b.close()  # idempotent
    with pytest.raises(BackendClosed):
        b.infer({"images": images})
