"""onnx2engine: clear errors where TensorRT or a GPU is missing, and the build path per TensorRT major
version on fakes of TensorRT 10/11 and cuda-python (tests/runtime/fakes; these run everywhere); on a
GPU with TensorRT (marked trt/gpu): fp32 / fp16 / int8 engines for lenet5 and kiln-det-s compared with ONNX
Runtime on the same graph, provenance in kiln.json, load() choosing the engine, timing cache reuse."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.bundle import Architecture, BatchRange, Bundle, InputSpec, Manifest, Preprocess, TensorSpec
from kiln.errors import BackendUnavailable, ConfigError, ExportError
from kiln.export import onnx2engine as onnx2engine_module
from kiln.export.onnx2engine import build_flags, onnx2engine
from kiln.runtime import cuda, load
from kiln.runtime.tensorrt import TensorRTBackend, check_provenance, engine_compatible, unavailable_reason
from tests.runtime import fakes

BATCH = BatchRange(min=1, opt=2, max=4)


def test_engine_compatible_is_the_runtime_rule() -> None:
    assert onnx2engine_module.engine_compatible is engine_compatible


def test_bad_arguments_fail_before_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown precision 'fp8'. Valid: fp32, fp16, int8"):
        onnx2engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision="fp8", batch=BATCH,
                    input_name="images")
    with pytest.raises(ConfigError, match="workspace must be > 0"):
        onnx2engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision="fp32", batch=BATCH,
                    input_name="images",
                    workspace_gib=0)


@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT and a GPU are present")
def test_without_tensorrt_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"")
    engine = tmp_path / "m.engine"
    with pytest.raises(BackendUnavailable,
                       match=r"pip install '\.\[trt\]' in the kiln checkout on a machine with an NVIDIA "
                             r"GPU|needs an NVIDIA GPU"):
        onnx2engine(tmp_path / "m.onnx", engine, precision="fp32", batch=BATCH, input_name="images")
    assert not engine.exists()


# ---- on fakes of TensorRT 10 / 11 and cuda-python ---------------------------------------------


GRAPH_LAYERS = {"fp32": [("CONVOLUTION", "FLOAT")], "fp16": [("CONVOLUTION", "HALF")],
                "int8": [("QUANTIZE", "INT8"), ("DEQUANTIZE", "FLOAT"), ("CONVOLUTION", "FLOAT")]}


def _build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, major: int, precision: str,
           **kw: Any) -> tuple[Any, dict[str, Any]]:
    env = fakes.install(monkeypatch, major=major)
    graph = fakes.make_graph(tmp_path / f"m.{precision}.onnx", layers=GRAPH_LAYERS[precision],
                             plugins=kw.pop("plugins", False))
    prov = onnx2engine(graph, tmp_path / f"m.{precision}.engine", precision=precision, batch=BATCH,
                       input_name="images", **kw)
    return env, prov


def _network_flags(env: Any) -> list[int]:
    return [c[1] for c in env.trt.calls if c[0] == "create_network"]


def _builder_flags(env: Any) -> list[str]:
    return [c[1] for c in env.trt.calls if c[0] == "set_flag"]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt10_builds_strongly_typed(precision: str, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    env, prov = _build(monkeypatch, tmp_path, 10, precision)
    # STRONGLY_TYPED is value 1 in TensorRT 10; no precision flag (TensorRT 10 rejects them on such networks).
    assert _network_flags(env) == [1 << 1] and _builder_flags(env) == []
    assert (
        prov["strongly_typed"]
        and prov["tensorrt_version"] == "10.13.0.35"
        and prov["profile"] == {"min": 1, "opt": 2, "max": 4}
    )


@pytest.mark.parametrize(("precision", "flags"), [("fp32", []), ("fp16", ["FP16"]), ("int8", ["INT8"])])
def test_tensorrt10_weakly_typed_uses_precision_flags(precision: str, flags: list[str],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    env, prov = _build(monkeypatch, tmp_path, 10, precision, strongly_typed=False)
    assert _network_flags(env) == [0] and _builder_flags(env) == flags and prov["strongly_typed"] is False


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt11_sets_no_typing_or_precision_flag(precision: str, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    env, prov = _build(monkeypatch, tmp_path, 11, precision, version_compat=True)
    assert not hasattr(env.trt.BuilderFlag, "FP16") and not hasattr(
        env.trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"
    )
    assert _network_flags(env) == [0] and _builder_flags(env) == ["VERSION_COMPATIBLE"]
    assert env.trt.deprecations == [] and prov["strongly_typed"]
    with pytest.raises(ConfigError, match="TensorRT 11 builds strongly typed networks only"):
        _build(monkeypatch, tmp_path, 11, precision, strongly_typed=False)


def test_build_flags_table() -> None:
    assert build_flags(10, "fp16") == (["STRONGLY_TYPED"], [])
    assert build_flags(10, "int8", strongly_typed=False) == ([], ["INT8"])
    assert build_flags(11, "int8") == ([], [])


def test_older_tensorrt_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = fakes.install(monkeypatch, major=8)
    graph = fakes.make_graph(tmp_path / "m.onnx")
    with pytest.raises(BackendUnavailable,
                       match=r"^TensorRT 8.6.1.6 is not supported: kiln runs TensorRT 10 and 11$"):
        onnx2engine(graph, tmp_path / "m.engine", precision="fp32", batch=BATCH, input_name="images")
    assert env.trt.calls == [] and not (tmp_path / "m.engine").exists()


def test_parser_errors_name_the_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fakes.install(monkeypatch)
    graph = fakes.make_graph(tmp_path / "m.onnx",
                             errors=[{"node": 3, "name": "conv1", "op": "Conv", "desc": "bad pads"}])
    with pytest.raises(ExportError,
                       match=r"TensorRT cannot parse .*m.onnx: node 3 'conv1' \(op Conv\): bad pads"):
        onnx2engine(graph, tmp_path / "m.engine", precision="fp32", batch=BATCH, input_name="images")


def test_wrong_graph_for_the_precision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fakes.install(monkeypatch)
    graph = fakes.make_graph(tmp_path / "m.onnx", layers=GRAPH_LAYERS["fp32"])
    with pytest.raises(ExportError, match="no Quantize/DequantizeLinear nodes"):
        onnx2engine(graph, tmp_path / "m.engine", precision="int8", batch=BATCH, input_name="images")


def test_plugin_layers_parse_and_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env, prov = _build(monkeypatch, tmp_path, 10, "fp32", plugins=True)
    assert env.trt.calls[0] == ("init_libnvinfer_plugins", "")
    env = fakes.install(monkeypatch)  # a fresh process: the backend must register them itself
    specs = {"inputs": [TensorSpec(name="images", shape=[1, 28, 28])],
             "outputs": [TensorSpec(name="logits", shape=[10])]}
    with TensorRTBackend(tmp_path / "m.fp32.engine", **specs) as b:
        assert b.max_batch == 4
    assert env.trt.violations == []


def test_timing_cache_is_reused_and_replaced_when_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    _build(monkeypatch, tmp_path, 10, "fp32", timing_cache=cache)
    assert "does not match this GPU" in caplog.text and cache.read_bytes().startswith(
        b"fake-cache:10.13.0.35"
    )
    caplog.clear()
    _build(monkeypatch, tmp_path, 10, "fp16", timing_cache=cache)
    assert "does not match" not in caplog.text


def test_version_compatible_engine_from_10_runs_on_11(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    _, prov = _build(monkeypatch, tmp_path, 10, "fp16", version_compat=True)
    env = fakes.install(monkeypatch, major=11)
    gpu = cuda.device_info(0)
    assert check_provenance(prov, env.trt.__version__, gpu)[0]
    specs = {"inputs": [TensorSpec(name="images", shape=[1, 28, 28])],
             "outputs": [TensorSpec(name="logits", shape=[10])]}
    with TensorRTBackend(tmp_path / "m.fp16.engine", **specs, version_compat=True) as b:
        x = np.ones((2, 1, 28, 28), np.float32)
        np.testing.assert_array_equal(b.infer({"images": x})["logits"], np.full((2, 10), 2, np.float32))


# ---- with TensorRT and a GPU -------------------------------------------------------------------


@pytest.fixture
def trt_gpu() -> Any:
    """Skip unless the real TensorRT and a GPU are here (tensorrt-stubs alone imports as an empty
    namespace package, so importorskip is not enough)."""
    trt = pytest.importorskip("tensorrt")
    if not hasattr(trt, "Builder"):
        pytest.skip("only tensorrt-stubs is installed, not TensorRT")
    if cuda.device_count() == 0:
        pytest.skip(f"no CUDA GPU: {cuda.no_gpu_reason()}")
    return trt


def _detector_bundle(root: Path) -> Path:
    import torch

    from kiln.models import build_model
    from kiln.train.tasks import make_task

    arch = Architecture(name="kiln-det-s", args={"num_classes": 3, "in_channels": 3, "image_size": 256})
    try:
        model = build_model(arch).eval()
        task = make_task("detect", 3)
    except (ImportError, KeyError, ValueError, ConfigError) as exc:
        pytest.skip(f"kiln-det-s is not available yet: {exc}")
    root.mkdir(parents=True)
    torch.save(model.state_dict(), root / "model.pt")
    manifest = Manifest(
        kiln_version="test", task="detect", classes=["a", "b", "c"],
        input=InputSpec(name="images", shape=[3, 256, 256], batch=BATCH),
        outputs=task.outputs(model, 3), postprocess=task.postprocess(),
        preprocess=Preprocess(mode="letterbox", size=(256, 256), mean=[0.5] * 3, std=[0.25] * 3),
        architecture=arch,
    )
    b = Bundle(root, manifest)
    b.add_artifact("model.pt", "torch", "fp32")
    b.save()
    return root


def _onnx_variants(bundle: Bundle, tmp: Path) -> dict[str, Path]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _RandomReader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, name: str, shape: list[int]) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter(
                [{name: rng.standard_normal((2, *shape)).astype(np.float32)} for _ in range(8)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    from kiln.export.onnx2fp16 import onnx2fp16
    from kiln.export.torch2onnx import torch2onnx

    paths = {"fp32": bundle.path("model.onnx"), "fp16": bundle.path("model.fp16.onnx"),
             "int8": bundle.path("model.int8.onnx")}
    torch2onnx(bundle, paths["fp32"], batch=BATCH)
    onnx2fp16(paths["fp32"], paths["fp16"])
    quantize_static(
        str(paths["fp32"]), str(paths["int8"]),
        _RandomReader(bundle.manifest.input.name, bundle.manifest.input.shape),
        quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    for precision, path in paths.items():
        bundle.add_artifact(path.name, "onnx", precision)
    bundle.save()
    return paths


# of the largest |output|; fp32 engines build without TF32
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.15}


# A mark, not only the fixture: session fixtures (the trained digits bundle) are set up before a
# function fixture could skip.
_WHY_NOT = unavailable_reason()


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(_WHY_NOT is not None, reason=f"needs TensorRT and a GPU: {_WHY_NOT}")
@pytest.mark.parametrize("model", ["lenet5", "kiln-det-s"])
def test_engines_match_onnxruntime(trt_gpu: Any, model: str, digits_bundle: Path, tmp_path: Path) -> None:
    if model == "lenet5":
        root = Path(shutil.copytree(digits_bundle, tmp_path / "b", ignore=shutil.ignore_patterns(".cache")))
    else:
        root = _detector_bundle(tmp_path / "b")
    bundle = Bundle.load(root)
    onnx_paths = _onnx_variants(bundle, tmp_path)
    spec = bundle.manifest.input
    x = np.random.default_rng(1).standard_normal((3, *spec.shape)).astype(np.float32)
    cache = tmp_path / "timing.cache"
    for precision, onnx_path in onnx_paths.items():
        engine = root / f"model.{precision}.engine"
        prov = onnx2engine(onnx_path, engine, precision=precision, batch=BATCH, input_name=spec.name,
                           timing_cache=cache)
        assert prov["tensorrt_version"] == trt_gpu.__version__ and prov["precision"] == precision
        assert prov["profile"] == {"min": 1, "opt": 2, "max": 4} and prov["compute_capability"]
        assert cache.stat().st_size > 0
        bundle.add_artifact(engine.name, "tensorrt", **prov)
        bundle.save()
        assert engine_compatible(prov) == (True, engine_compatible(prov)[1])
        with load(root, "tensorrt", precision=precision) as trt_b, load(root, "onnxrt",
                                                                        precision=precision) as ort_b:
            assert (trt_b.min_batch, trt_b.max_batch) == (1, 4)
            got, want = trt_b.infer({spec.name: x}), ort_b.infer({spec.name: x})
            assert set(trt_b.last_timings) == {"h2d_ms", "compute_ms", "d2h_ms", "total_ms"}
            assert trt_b.last_timings["compute_ms"] > 0
        for name, ref in want.items():
            scale = max(1.0, float(np.abs(ref).max()))
            assert got[name].shape == ref.shape and got[name].dtype == ref.dtype
            assert float(np.abs(got[name] - ref).max()) <= TOLERANCE[precision] * scale, (precision, name)
    with load(root) as auto:  # with engines for this GPU, auto picks TensorRT (fp16 first)
        assert (auto.name, auto.precision, auto.fallback_log) == ("tensorrt", "fp16", [])


# ---- TF32, engine and timing-cache names ------------------------------------------------------

SPECS = {"inputs": [TensorSpec(name="images", shape=[1, 28, 28])],
         "outputs": [TensorSpec(name="logits", shape=[10])]}


@pytest.mark.parametrize("major", [10, 11])
def test_fp32_engine_computes_in_fp32_unless_tf32_is_asked_for(major: int, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    # Values that need more than TF32's 10 mantissa bits: TensorRT's default (TF32 on) would round them.
    x = (1 + np.arange(2 * 784, dtype=np.float32).reshape(2, 1, 28, 28) / 4096).astype(np.float32)
    env, prov = _build(monkeypatch, tmp_path, major, "fp32")
    assert prov["tf32"] is False and ("clear_flag", "TF32") in env.trt.calls
    with TensorRTBackend(tmp_path / "m.fp32.engine", **SPECS) as b:
        np.testing.assert_array_equal(b.infer({"images": x})["logits"], 2 * x.reshape(2, -1)[:, :10])
    env, prov = _build(monkeypatch, tmp_path, major, "fp32", tf32=True)
    assert prov["tf32"] is True and ("clear_flag", "TF32") not in env.trt.calls
    with TensorRTBackend(tmp_path / "m.fp32.engine", **SPECS) as b:
        got = b.infer({"images": x})["logits"]
    assert not np.array_equal(got, 2 * x.reshape(2, -1)[:, :10])
    np.testing.assert_allclose(got, 2 * x.reshape(2, -1)[:, :10], rtol=2 ** -10)


def test_export_tf32_flag_reaches_the_builder() -> None:
    from kiln.cli import build_parser
    from kiln.export.cli import _options

    args = build_parser().parse_args(["export", "runs/x", "--engine", "--tf32"])
    assert _options(args).tf32 is True
    assert _options(build_parser().parse_args(["export", "runs/x", "--engine"])).tf32 is False


def test_engine_and_cache_names_carry_gpu_model_and_tensorrt_version() -> None:
    from kiln.runtime.tensorrt import engine_file_name, timing_cache_name

    assert engine_file_name("fp16", "NVIDIA L4", "10.13.0.35") == "model.fp16.nvidia-l4.trt-10.13.0.35.engine"
    assert engine_file_name("fp16", "NVIDIA A10G", "10.13.0.35") != engine_file_name(
        "fp16", "NVIDIA L4", "10.13.0.35"
    )
    assert (
        timing_cache_name("NVIDIA A100-SXM4-80GB", "11.4.0.106")
        == "timing.nvidia-a100-sxm4-80gb.trt-11.4.0.106.cache"
    )


def test_a_timing_cache_folder_keeps_one_cache_per_gpu_model(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    from kiln.runtime.tensorrt import timing_cache_name

    caches = tmp_path / "caches"
    caches.mkdir()
    (caches / "timing.cache").write_bytes(b"fake-cache:10.13.0.35 from before caches were keyed")
    env, _ = _build(monkeypatch, tmp_path, 10, "fp32", timing_cache=caches)
    first = caches / timing_cache_name(env.gpu.name, env.trt.__version__)
    assert first.read_bytes().startswith(b"fake-cache:10.13.0.35 from before")  # the older cache was read
    env = fakes.install(monkeypatch)
    env.gpu.name, env.gpu.capability = "NVIDIA A10G", (8, 6)
    graph = fakes.make_graph(tmp_path / "m.onnx")
    onnx2engine(graph, tmp_path / "a10g.engine", precision="fp32", batch=BATCH, input_name="images",
                timing_cache=caches)
    second = caches / timing_cache_name("NVIDIA A10G", env.trt.__version__)
    assert first.is_file() and second.is_file() and first != second
    assert sorted(p.name for p in caches.iterdir()) == sorted(["timing.cache", first.name, second.name])


def test_export_names_engines_per_gpu_and_replaces_only_this_gpus_older_entry(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    from kiln.export import pipeline

    env = fakes.install(monkeypatch)
    root = tmp_path / "b"
    root.mkdir()
    manifest = Manifest(kiln_version="test", task="classify", classes=[str(i) for i in range(10)],
                        input=InputSpec(name="images", shape=[1, 28, 28], batch=BATCH),
                        outputs=[TensorSpec(name="logits", shape=[10])],
                        preprocess=Preprocess(size=(28, 28), channels="L", mean=[0.5], std=[0.5]),
                        architecture=Architecture(name="lenet5"))
    bundle = Bundle(root, manifest)
    fakes.make_graph(root / "model.onnx")
    bundle.add_artifact("model.onnx", "onnx", "fp32")
    for legacy, gpu in (("model.fp32.engine", env.gpu.name), ("model.fp32.t4.engine", "Tesla T4")):
        (root / legacy).write_bytes(fakes.make_plan(env.trt.__version__))
        bundle.add_artifact(legacy, "tensorrt", "fp32", tensorrt_version=env.trt.__version__, gpu_name=gpu,
                            compute_capability="8.9")
    bundle.save()
    monkeypatch.setattr(pipeline, "_engine_metrics", lambda *_a: {})  # no validation split in this bundle
    built, errors = pipeline.build_engines(bundle,
                                           pipeline.ExportOptions(engine=True, batch=BATCH, tf32=True),
                                           {"fp32": "model.onnx"})
    assert errors == []
    (entry,) = built
    file = f"model.fp32.fake-gpu.trt-{env.trt.__version__}.engine"
    assert entry["file"] == file and entry["tf32"] is True
    # The older entry for this GPU and TensorRT is replaced; the other GPU's engine stays listed.
    assert sorted(Bundle.load(root).manifest.artifacts) == sorted(
        ["model.onnx", file, "model.fp32.t4.engine"]
    )


@pytest.mark.parametrize(("capability", "builds"), [((8, 0), True), ((7, 5), False)])
def test_hardware_compatible_build_from_compute_capability_8_0(capability: tuple[int, int], builds: bool,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    env = fakes.install(monkeypatch)
    env.gpu.name, env.gpu.capability = "NVIDIA A100", capability
    graph = fakes.make_graph(tmp_path / "m.onnx")
    build = lambda: onnx2engine(graph, tmp_path / "m.engine", precision="fp32", batch=BATCH,  # noqa: E731
                                input_name="images", hardware_compat=True)
    if not builds:
        with pytest.raises(ExportError, match="need compute capability >= 8.0; NVIDIA A100 has 7.5"):
            build()
        return
    prov = build()
    assert prov["hardware_compat"] is True and prov["compute_capability"] == "8.0"
    env.gpu.name, env.gpu.capability = "NVIDIA H100", (9, 0)  # another Ampere-or-newer GPU runs it
    assert check_provenance(prov, env.trt.__version__, cuda.device_info(0))[0]
    with TensorRTBackend(tmp_path / "m.engine", **SPECS) as b:
        assert b.max_batch == 4
