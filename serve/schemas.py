"""Request and response bodies: the native ``/v1`` API and the KServe v2 / Open Inference Protocol.

The v2 models follow the Open Inference Protocol REST spec (server and model metadata, inference
request and response with JSON tensors); ``data`` may be flat (row-major) or nested.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# ---- errors --------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. invalid_image, queue_full")
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server answers has this shape."""

    error: ErrorBody


# ---- native API (/v1) ----------------------------------------------------------------------------


class PredictRequest(BaseModel):
    """JSON alternative to a multipart upload: each image as base64 (PNG, JPEG, ... file bytes)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1, description="base64-encoded image files")
    top_k: int | None = Field(None, ge=1, description="classification: how many labels to return")
    conf: float | None = Field(None, ge=0, le=1,
                               description="detection: score threshold (default: kiln.json)")
    iou: float | None = Field(None, ge=0, le=1, description="detection: NMS IoU threshold")
    max_det: int | None = Field(None, ge=1, description="detection: boxes kept per image")
    agnostic: bool | None = Field(None, description="detection: NMS across classes")
    multi_label: bool | None = Field(None, description="detection: a box once per class over the threshold")
    classes: list[str] | None = Field(None,
                                      description="detection: keep only these classes (labels or indices)")


class DetectControls(BaseModel):
    """The detection controls of a JSON predict body (the images are read elsewhere)."""

    model_config = ConfigDict(extra="ignore")

    conf: float | None = None
    iou: float | None = None
    max_det: int | None = None
    agnostic: bool | None = None
    multi_label: bool | None = None
    classes: list[str] | None = None


class LabelScore(BaseModel):
    label: str
    index: int
    score: float


class Detection(LabelScore):
    box: list[float] = Field(description="x1, y1, x2, y2 in original-image pixels", min_length=4,
                             max_length=4)


class ImagePrediction(BaseModel):
    width: int = Field(description="original image width in pixels")
    height: int
    top_k: list[LabelScore] | None = Field(None, description="classification results, best first")
    boxes: list[Detection] | None = Field(None, description="detection results, best first")


class PredictResponse(BaseModel):
    model: str
    task: Literal["classify", "detect"]
    backend: str
    precision: str
    request_id: str
    predictions: list[ImagePrediction]


class TensorInfo(BaseModel):
    name: str
    shape: list[int] = Field(description="without the batch axis")
    dtype: str


class BatchInfo(BaseModel):
    min: int
    max: int


class ModelInfo(BaseModel):
    name: str
    task: Literal["classify", "detect"]
    labels: list[str]
    ready: bool
    backend: str | None = Field(None, description="chosen runtime, once loaded")
    precision: str | None = None
    device: str | None = None
    batch: BatchInfo
    input: TensorInfo
    outputs: list[TensorInfo]
    preprocess: dict[str, Any]
    postprocess: dict[str, Any]
    error: str | None = Field(None, description="why the model failed to load")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "stopping"]
    models: dict[str, str] = Field(default_factory=dict)


# ---- KServe v2 / Open Inference Protocol -----------------------------------------------------------

# Open Inference Protocol datatypes and their numpy dtypes (BYTES carries encoded images, see V2Datatype).
V2_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2 = {np.dtype(v).name: k for k, v in V2_DTYPES.items()}


@functools.cache
def v2_datatype(dtype: str | np.dtype[Any]) -> str:
    """The protocol's datatype name of a numpy dtype (cached: it is asked for every output of every
    request)."""
    name = np.dtype(dtype).name
    if name not in NUMPY_TO_V2:
        raise ValueError(f"dtype {name} has no Open Inference Protocol datatype")
    return NUMPY_TO_V2[name]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks the dynamic batch axis")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] = Field(default_factory=dict)


V2_DATATYPE_NAMES = (*V2_DTYPES, "BYTES")
V2Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                     "FP32", "FP64", "BYTES"]
TensorName = Annotated[str, Field(min_length=1, max_length=256)]


class V1PredictRequest(BaseModel):
    """KServe V1 ``:predict``: one instance per image, each the model's input tensor as nested lists
    (preprocessed) or an encoded image file as ``{"b64": "<base64>"}``."""

    model_config = ConfigDict(extra="forbid")

    instances: list[list[Any] | dict[str, Any]] = Field(
        min_length=1,
        description='per image: the input tensor as nested lists, or {"b64": "<encoded image file>"}')


class V1PredictResponse(BaseModel):
    """KServe V1 ``:predict``'s answer: per instance what ``/v1/models/{name}/predict`` answers per image."""

    predictions: list[dict[str, Any]]


class V2Error(BaseModel):
    """Errors on the /v2 routes, as the Open Inference Protocol defines them."""

    error: str


class InputParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    binary_data_size: int | None = Field(
        None, ge=0,
        description="binary data extension: this tensor's bytes follow the JSON header, in input order"
    )


class RequestInput(BaseModel):
    model_config = ConfigDict(strict=True)

    name: TensorName
    shape: list[Annotated[int, Field(ge=0)]] = Field(description="with the batch axis first")
    datatype: V2Datatype = Field(
        description="BYTES: encoded image files (PNG, JPEG, ...), shape [N] or [N, 1]")
    parameters: InputParameters | None = None
    data: list[Any] | None = Field(None,
                                   description="flat (row-major) or nested; absent with binary_data_size")


class OutputParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    binary_data: bool | None = Field(None,
                                     description="binary data extension: answer this output as raw bytes")


class RequestOutput(BaseModel):
    model_config = ConfigDict(strict=True)

    name: TensorName
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    binary_data_output: bool | None = Field(None, description="answer every output as raw bytes")


class InferenceRequest(BaseModel):
    """The JSON of ``POST /v2/models/{name}/infer``; with the binary data extension it is the first
    ``Inference-Header-Content-Length`` bytes of the body and the tensors' bytes follow."""

    model_config = ConfigDict(strict=True)

    id: str | None = None
    parameters: RequestParameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class RepositoryIndexRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    ready: bool | None = Field(None, description="true: only the models that are ready")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="absent when the output is answered as binary data")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]
