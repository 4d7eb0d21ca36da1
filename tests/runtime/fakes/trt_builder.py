"""The fake TensorRT's build side: network, ONNX parser, optimization profile, timing cache, builder
config and builder (see tensorrt.py for the behaviour modelled).

The classes that need the fake module (``trt``: its enums, ``calls``, version, plugins) or the device
read them from class attributes that :func:`install_builder` binds into one subclass per fake module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .device import FakeDevice
from .trt_types import PRECISION_FLAGS, DataType, Dims, make_plan


class Tensor:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: str) -> None:
        self.name, self.shape, self.dtype = name, Dims(shape), DataType[dtype]


class Layer:
    def __init__(self, kind: Any, dtype: str) -> None:
        self.type, self.num_outputs, self._out = kind, 1, Tensor("", (), dtype)

    def get_output(self, i: int) -> Tensor:
        return self._out


class Network:
    def __init__(self, strongly_typed: bool) -> None:
        self.strongly_typed = strongly_typed
        self.graph: dict[str, Any] = {}
        self._inputs: list[Tensor] = []
        self._layers: list[Layer] = []

    num_inputs = property(lambda self: len(self._inputs))
    num_layers = property(lambda self: len(self._layers))

    def get_input(self, i: int) -> Tensor:
        return self._inputs[i]

    def get_layer(self, i: int) -> Layer:
        return self._layers[i]


class ParserError:
    def __init__(self, e: dict[str, Any]) -> None:
        self.e = e

    def node(self) -> int:
        return int(self.e.get("node", -1))

    def node_name(self) -> str:
        return str(self.e.get("name", ""))

    def node_operator(self) -> str:
        return str(self.e.get("op", ""))

    def desc(self) -> str:
        return str(self.e["desc"])


class Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, name: str, lo: Dims, opt: Dims, hi: Dims) -> None:
        if not lo[0] <= opt[0] <= hi[0]:
            raise ValueError(f"profile for {name}: min <= opt <= max violated")
        self.shapes[name] = (Dims(lo), Dims(opt), Dims(hi))


class TimingCache:
    def __init__(self, data: bytes, version: str) -> None:
        self.data = data or f"fake-cache:{version}".encode()

    def serialize(self) -> bytes:
        return self.data + b"+"


class _OnnxParser:
    trt: Any

    def __init__(self, network: Network, logger: Any) -> None:
        self.network, self.errors = network, []

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i: int) -> ParserError:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        trt = self.trt
        graph = json.loads(Path(path).read_text())
        errors = list(graph["errors"])
        if graph["plugins"] and not trt.plugins_registered:
            errors.append({"node": 0, "name": "nms", "op": "EfficientNMS_TRT",
                           "desc": "plugin creator not found"})
        elif graph["plugins"]:
            trt.plugin_used("EfficientNMS_TRT")
        self.errors = [ParserError(e) for e in errors]
        self.network.graph = graph
        self.network._inputs = [Tensor(n, tuple(s), d) for n, s, d in graph["inputs"]]
        self.network._layers = [Layer(trt.LayerType[k], d) for k, d in graph["layers"]]
        return not self.errors


class _Config:
    trt: Any

    def __init__(self) -> None:
        self.flags: set[str] = {"TF32"}  # enabled by default
        self.profiles: list[Profile] = []
        self.hardware_compatibility_level = self.trt.HardwareCompatibilityLevel.NONE
        self.cache: TimingCache | None = None

    def set_flag(self, flag: Any) -> None:
        self.trt.calls.append(("set_flag", flag.name))
        self.flags.add(flag.name)

    def clear_flag(self, flag: Any) -> None:
        self.trt.calls.append(("clear_flag", flag.name))
        self.flags.discard(flag.name)

    def get_flag(self, flag: Any) -> bool:
        return flag.name in self.flags

    def add_optimization_profile(self, profile: Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.trt.calls.append(("set_memory_pool_limit", pool.name, size))

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(bytes(data), self.trt.__version__)

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        if not cache.data.startswith(f"fake-cache:{self.trt.__version__}".encode()):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> TimingCache | None:
        return self.cache


class _Builder:
    trt: Any
    major: int
    gpu: FakeDevice
    config: type[_Config]

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> Network:
        trt = self.trt
        trt.calls.append(("create_network", flags))
        known = {1 << int(f) for f in trt.NetworkDefinitionCreationFlag}
        if any(flags & (1 << b) and (1 << b) not in known for b in range(32)):
            raise TypeError(f"create_network: unknown NetworkDefinitionCreationFlag bits in {flags:#x}")
        strongly = bool(flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
        if self.major >= 11 and strongly:
            trt.deprecations.append("NetworkDefinitionCreationFlag.STRONGLY_TYPED is deprecated and ignored")
        return Network(strongly or self.major >= 11)

    def create_builder_config(self) -> _Config:
        return self.config()

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: Network, config: _Config) -> bytes | None:
        trt, gpu = self.trt, self.gpu
        trt.calls.append(("build", network.strongly_typed, sorted(config.flags)))
        error = self._invalid(network, config)
        if error:
            self.logger.log(trt.ILogger.Severity.ERROR, error)
            return None
        graph = network.graph
        lo, opt, hi = config.profiles[0].shapes[graph["inputs"][0][0]]
        tensors = [(n, "INPUT", s, d) for n, s, d in graph["inputs"]] + [
            (n, "OUTPUT", s, d) for n, s, d in graph["outputs"]
        ]
        return make_plan(trt.__version__, tensors=tensors, profile=(lo[0], opt[0], hi[0]),
                         version_compatible="VERSION_COMPATIBLE" in config.flags, plugins=graph["plugins"],
                         gpu_name=gpu.name, capability=gpu.capability, tf32="TF32" in config.flags,
                         hardware_compatible=config.hardware_compatibility_level.name == "AMPERE_PLUS")

    @staticmethod
    def _invalid(network: Network, config: _Config) -> str | None:
        precision = config.flags & set(PRECISION_FLAGS)
        if network.strongly_typed and precision:
            return f"precision builder flags {sorted(precision)} are not allowed on a strongly typed network"
        kinds = {layer.type.name for layer in network._layers}
        if not network.strongly_typed and {"QUANTIZE", "DEQUANTIZE"} & kinds and "INT8" not in config.flags:
            return "network has Q/DQ layers but INT8 is not enabled"
        missing = [n for n, s, _ in network.graph["inputs"] if s[0] < 0
                   and not any(n in p.shapes for p in config.profiles)]
        return f"no optimization profile for {missing}" if missing else None


def bind(cls: type, **attrs: Any) -> Any:
    """A subclass of ``cls`` named without the underscore, with ``attrs`` as class attributes."""
    return type(cls.__name__.lstrip("_"), (cls,), {"__module__": "tensorrt", **attrs})


def install_builder(trt: Any, major: int, gpu: FakeDevice) -> None:
    config = bind(_Config, trt=trt)
    trt.Builder = bind(_Builder, trt=trt, major=major, gpu=gpu, config=config)
    trt.OnnxParser, trt.ParserError = bind(_OnnxParser, trt=trt), ParserError
