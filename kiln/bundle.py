"""Read and write a bundle: a folder whose ``kiln.json`` describes everything a consumer needs.

Every stage takes a bundle path and nothing else: the task, class names, input spec, the pre- and
post-processing, the architecture, the training provenance and every artifact (with sha256, precision
and measured accuracy) are recorded here. ``model.pt`` holds only a state dict.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from kiln.errors import BundleError
from kiln.fsutil import atomic_write_json, sha256_file
from kiln.vocab import Task

log = logging.getLogger("kiln.bundle")

MANIFEST = "kiln.json"
# 2: closed records (extra keys refused), engine provenance under an artifact's ``engine``; see migrate()
SCHEMA_VERSION = 2

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class BatchRange(_Model):
    """Dynamic batch range: the optimization profile of an engine and what the server may batch."""

    min: int = Field(1, ge=1)
    opt: int = Field(8, ge=1)
    max: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> BatchRange:
        if not self.min <= self.opt <= self.max:
            raise ValueError(
                f"batch range must satisfy MIN <= OPT <= MAX, got {self.min}:{self.opt}:{self.max}")
        return self

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """Parse ``MIN:OPT:MAX`` (or a single number N meaning N:N:N)."""
        parts = text.split(":")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"expected MIN:OPT:MAX with integers, got '{text}'") from None
        if len(nums) == 1:
            nums = nums * 3
        if len(nums) != 3:
            raise ValueError(f"expected MIN:OPT:MAX, got '{text}'")
        if min(nums) < 1:
            raise ValueError(f"batch sizes must be >= 1, got '{text}'")
        if not nums[0] <= nums[1] <= nums[2]:
            raise ValueError(f"batch range must satisfy MIN <= OPT <= MAX, got {text}")
        return cls(min=nums[0], opt=nums[1], max=nums[2])

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


class TensorSpec(_Model):
    """A named tensor without its batch dimension: ``shape`` excludes the leading batch axis."""

    name: str
    shape: list[int]
    dtype: str = "float32"


class InputSpec(TensorSpec):
    layout: str = "NCHW"
    batch: BatchRange = Field(default_factory=BatchRange)


DecodeMode = Literal["full", "draft"]


class Preprocess(_Model):
    """How an image becomes the model input (see :mod:`kiln.processing`).

    ``resize``: resize to ``size`` (H, W). ``letterbox``: scale to fit keeping the aspect ratio and pad
    with ``pad_value``; the offsets are kept so boxes map back to the original pixels. ``center_crop``:
    resize the shorter side to ``resize_size`` and cut the central ``size`` (pretrained classifiers).
    Fields added later have defaults, so older kiln.json files load unchanged.
    """

    mode: Literal["resize", "letterbox", "center_crop"] = "resize"
    size: tuple[int, int]
    channels: Literal["L", "RGB"] = "RGB"
    mean: list[float]
    std: list[float]
    pad_value: int = 114
    interpolation: Literal["bilinear", "nearest", "bicubic", "lanczos"] = "bilinear"
    # center_crop: the shorter side is resized to resize_size, then the centre size (H, W) is cut out,
    # as torchvision's and timm's ImageNet evaluation transforms do; the weights' recipe is kept here.
    resize_size: int | None = Field(None, ge=1)
    # where the recipe comes from, e.g. "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    source: str | None = None
    # How a JPEG is decoded (kiln.processing.decode): "draft" at the smallest DCT scale that still covers
    # the model input (libjpeg's downscaling, one resize after it), "full" at full size. Other formats are
    # always decoded in full. A kiln.json written before this field existed was measured with full
    # decodes and reads as "full" (Bundle.load); a new recipe takes the fast one.
    decode: DecodeMode = "draft"


class ClassifyPost(_Model):
    top_k: int = 5


class DetectPost(_Model):
    """Detection post-processing defaults; predict, serve and eval may override each per call."""

    score_threshold: float = Field(0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(0.5, ge=0.0, le=1.0)
    max_detections: int = Field(100, ge=1)
    class_agnostic: bool = False  # NMS across classes: one box per object whatever its label
    # a box once per class over the threshold (mAP protocols), not its best class only
    multi_label: bool = False
    classes: list[int] | None = None  # keep only these class indices; None keeps every class


class Architecture(_Model):
    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class EngineProvenance(_Model):
    """How and where a TensorRT plan was built: what decides whether it runs on a machine
    (:func:`kiln.runtime.engines.check_provenance`). Fields are optional so that an engine recorded without
    them still loads; the runtime then refuses it with the missing names."""

    tensorrt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    profile: BatchRange | None = None  # the optimization profile's min/opt/max batch
    build_seconds: float | None = None
    hardware_compat: bool = False  # AMPERE_PLUS: runs on any GPU of compute capability 8.0 or newer
    version_compat: bool = False  # runs on later TensorRT releases of its major version
    strongly_typed: bool | None = None
    tf32: bool | None = None


ENGINE_KEYS = frozenset(EngineProvenance.model_fields)


class NmsRecord(_Model):
    """The NMS inside a detector's end-to-end graph (``kiln export --nms``), baked in at export."""

    score_threshold: float
    iou_threshold: float
    max_detections: int
    class_agnostic: bool = False
    pre_nms_top_k: int | None = None
    multi_label: bool = False
    box_format: str = "xyxy"
    coordinates: str = "letterboxed input pixels"


class CalibrationRecord(_Model):
    """How an INT8 graph was calibrated (the full report is the file ``calibration_report`` names)."""

    method: str | None = None
    layout: str | None = None  # "tensorrt" (Q/DQ TensorRT builds from) or "cpu" (for ONNX Runtime on a CPU)
    images: int | None = None
    excluded_layers: list[str] = Field(default_factory=list)
    fp32: Any = None
    int8: Any = None
    drop: float | None = None
    latency_ms_ort_cpu: Any = None


class Artifact(_Model):
    """One file of the bundle: a PyTorch state dict, an ONNX graph or a TensorRT plan, with where it
    comes from. Fields that do not apply to a format are None and are not written to kiln.json."""

    file: str
    format: Literal["torch", "onnx", "tensorrt"]
    precision: str = "fp32"
    sha256: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    source_sha256: str | None = None  # the sha256 of the artifact it was made from
    verification: dict[str, Any] | None = None  # its outputs compared with its source's on validation images
    # ONNX graphs
    opset: int | None = None
    simplified: bool | None = None
    exporter: str | None = None
    converter: str | None = None
    keep_io_types: bool | None = None
    batch: BatchRange | None = None
    calibration: CalibrationRecord | None = None
    calibration_report: str | None = None
    nms: NmsRecord | None = None  # set on a detector's end-to-end graph only
    outputs: list[TensorSpec] | None = None  # its own outputs when they differ from kiln.json's
    anchors: int | None = None
    # TensorRT plans
    engine: EngineProvenance | None = None

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


def nest_engine(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with engine provenance given flat (``tensorrt_version=...``, as schema 1 wrote it and as
    :func:`kiln.export.onnx2engine.onnx2engine` returns it) moved under ``engine``."""
    engine = {k: v for k, v in record.items() if k in ENGINE_KEYS}
    if not engine:
        return record
    out = {k: v for k, v in record.items() if k not in ENGINE_KEYS}
    out["engine"] = {**engine, **(out.get("engine") or {})}
    return out


def artifact_record(record: dict[str, Any]) -> dict[str, Any]:
    """An artifact of kiln.json schema 1 (flat, open) as schema 2 has it: its engine provenance under
    ``engine``; what schema 2 does not know (and nothing reads) is left out with a log line."""
    out = nest_engine(record)
    unknown = sorted(set(out) - set(Artifact.model_fields))
    for key in unknown:
        log.info("kiln.json: %s: dropping %r (not part of schema %d)", record.get("file"), key,
                 SCHEMA_VERSION)
        out.pop(key)
    return out


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """kiln.json as an older schema wrote it, brought to :data:`SCHEMA_VERSION`.

    Schema 1 (artifacts and the top level open to any key, engine provenance flat in the artifact)
    becomes schema 2 (closed records, provenance in typed fields). Raises ValueError for a newer schema.
    """
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(
            f"schema_version {version} is newer than this kiln reads ({SCHEMA_VERSION}); upgrade kiln")
    if version == SCHEMA_VERSION:
        return data
    data = dict(data, schema_version=SCHEMA_VERSION)
    arts = data.get("artifacts")
    if isinstance(arts, dict):
        data["artifacts"] = {k: artifact_record(v) if isinstance(v, dict) else v for k, v in arts.items()}
    for key in sorted(set(data) - set(Manifest.model_fields)):
        log.info("kiln.json: dropping top-level %r (not part of schema %d)", key, SCHEMA_VERSION)
        data.pop(key)
    pre = data.get("preprocess")
    if isinstance(pre, dict):
        pre.setdefault("decode", "full")  # written before decode modes: its accuracy is a full decode's
    return data


def is_end_to_end(art: Artifact) -> bool:
    """Whether ``art`` is a detector graph with NMS inside (``kiln export --nms``): it answers
    ``num_dets``, ``det_boxes``, ``det_scores``, ``det_classes`` instead of raw ``boxes`` and ``scores``."""
    return art.nms is not None


class Manifest(_Model):
    """The content of ``kiln.json`` (schema :data:`SCHEMA_VERSION`; :func:`migrate` reads older ones)."""

    schema_version: int = SCHEMA_VERSION
    kiln_version: str
    task: Task
    classes: list[str]
    input: InputSpec
    outputs: list[TensorSpec]
    preprocess: Preprocess
    postprocess: dict[str, Any] = Field(default_factory=dict)
    architecture: Architecture
    training: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, Artifact] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)

    def classify_post(self) -> ClassifyPost:
        return ClassifyPost.model_validate(self.postprocess)

    def detect_post(self) -> DetectPost:
        return DetectPost.model_validate(self.postprocess)


class Bundle:
    """A bundle folder and its manifest. ``save()`` rewrites kiln.json atomically."""

    def __init__(self, root: str | os.PathLike[str], manifest: Manifest) -> None:
        self.root = Path(root)
        self.manifest = manifest

    @property
    def name(self) -> str:
        return self.root.resolve().name

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Bundle:
        root = Path(path)
        if root.is_file() and root.name == MANIFEST:
            root = root.parent
        if not root.is_dir():
            raise BundleError(f"bundle folder not found: {root}")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(
                f"{root} is not a kiln bundle: {MANIFEST} is missing "
                f"(train one with `kiln train --out {root}`)"
            )
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"cannot read {manifest_path}: {exc}") from exc
        if not isinstance(data, dict):
            raise BundleError(f"invalid {manifest_path}: expected a JSON object")
        try:
            manifest = Manifest.model_validate(migrate(data))
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise BundleError(f"invalid {manifest_path}: {loc}: {first['msg']}") from exc
        except ValueError as exc:  # a schema newer than this kiln
            raise BundleError(f"invalid {manifest_path}: {exc}") from exc
        return cls(root, manifest)

    def save(self) -> Path:
        return atomic_write_json(self.root / MANIFEST, self.manifest.model_dump(mode="json"))

    def path(self, file: str) -> Path:
        return self.root / file

    def add_artifact(self, file: str, fmt: str, precision: str = "fp32", **extra: Any) -> Artifact:
        """Record ``file`` (already written inside the bundle) with its sha256 and the :class:`Artifact`
        fields in ``extra``; engine provenance may be given flat (:func:`nest_engine`)."""
        art = Artifact.model_validate(nest_engine(
            {"file": file, "format": fmt, "precision": precision, "sha256": sha256_file(self.root / file),
             **extra}
        ))
        self.manifest.artifacts[file] = art
        return art

    def artifacts(self, fmt: str | None = None, precision: str | None = None, *,
                  end_to_end: bool = False) -> list[Artifact]:
        """Artifacts of a format and precision; detectors' end-to-end graphs (NMS inside, other outputs)
        only with ``end_to_end``, so consumers of the raw outputs never pick one by accident."""
        return [
            a
            for a in self.manifest.artifacts.values()
            if (fmt is None or a.format == fmt) and (precision is None or a.precision == precision)
            and is_end_to_end(a) == end_to_end
        ]

    def outputs_of(self, art: Artifact) -> list[TensorSpec]:
        """The output tensors of ``art``: its own when it records them (an end-to-end graph), else
        kiln.json's."""
        return list(art.outputs) if art.outputs else list(self.manifest.outputs)

    def artifact(self, fmt: str, precision: str = "fp32") -> Artifact | None:
        found = self.artifacts(fmt, precision)
        return found[0] if found else None

    def verify_artifact(self, art: Artifact) -> Path:
        """Return the artifact's path after checking it exists and its sha256 matches kiln.json."""
        p = self.root / art.file
        if not p.is_file():
            raise BundleError(f"artifact {art.file} listed in {MANIFEST} is missing from {self.root}")
        digest = sha256_file(p)
        if digest != art.sha256:
            raise BundleError(
                f"artifact {p} does not match its sha256 in {MANIFEST} (modified after export?)")
        return p
