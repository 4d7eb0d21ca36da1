"""Server settings: command-line flags override ``KILN_*`` environment variables, which override defaults.

``KILN_MAX_BATCH=16 KILN_API_KEY=secret kiln serve runs/digits`` is the same as
``kiln serve runs/digits --max-batch 16 --api-key secret``. ``KILN_CORS_ORIGINS`` takes a
comma-separated list (or a JSON list). An empty ``KILN_API_KEY`` means no key: the server is open.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kiln.vocab import Precision


class Settings(BaseSettings):
    """Everything ``kiln serve`` can be told. ``None`` means "what the bundle or backend says"."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="KServe v2 gRPC port (0 picks a free one); none: no gRPC endpoint"
    )
    backend: str = Field("auto", description="auto | tensorrt | onnxrt | torch")
    precision: Precision | None = Field(None, description="artifact precision; default: the best available")
    max_batch: int | None = Field(None, ge=1, description="largest batch; default: the backend's maximum")
    max_delay_ms: float = Field(2.0, ge=0, description="how long a batch waits for more requests")
    max_queue: int = Field(256, ge=1, description="queued requests per model before 503")
    timeout_s: float = Field(30.0, gt=0, description="per-request deadline before 504")
    api_key: SecretStr | None = Field(None,
                                      description="require 'Authorization: Bearer KEY' (health stays open)")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="request body limit (413 above)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height limit per image")
    max_images_per_request: int = Field(64, ge=1, description="images in one predict request")
    max_request_pixels: int = Field(
        40_000_000, ge=1,
        description="decode budget: width x height summed over a request's images (413 above)"
    )
    max_pixels_per_byte: float = Field(
        256.0, gt=0,
        description="decompression-bomb guard: decoded pixels per byte of an image over 4 Mpx (400 above)"
    )
    decode_threads: int = Field(2, ge=1, description="requests decoding images at once, off the event loop")
    max_decode_queue: int = Field(
        64, ge=1,
        description="requests waiting for a decode thread, served in arrival order, before 503 + Retry-After"
    )
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="request line + headers limit (431 above)")
    body_timeout_s: float = Field(30.0, gt=0,
                                  description="wait for the next piece of a request body before 408")
    keep_alive_s: int = Field(5, ge=1,
                              description="close an idle keep-alive connection after this many seconds")
    drain_s: float = Field(
        5.0, ge=0,
        description="after SIGTERM: keep serving, /readyz answering 503, before the listener closes"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins; none by default (CORS off)"
    )
    top_k: int | None = Field(None, ge=1, description="classification: labels returned; default: kiln.json")
    warmup: bool = Field(True, description="run one batch per model before reporting ready")
    workers: int = Field(1, ge=1, description="server processes sharing the port, each with its own backends")
    end_to_end: bool = Field(False,
                             description="detectors: serve the graph with NMS inside (kiln export --nms)")
    threads: int | None = Field(
        None, ge=1,
        description="intra-op threads per model for ONNX Runtime and PyTorch; default: the runtime's"
    )

    # Request contents, checked against the model's shape before anything is materialised (v2 REST, gRPC).
    max_json_depth: int = Field(32, ge=4, le=512,
                                description="nesting depth of a JSON request body (400 above)")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [o.strip() for o in text.split(",") if o.strip()]
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        # KILN_API_KEY= (as docker/compose.yaml passes through when unset) means "no key",
        # not "the empty key".
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and not text.strip():
            return None
        return value

    @field_validator("backend")
    @classmethod
    def _backend_name(cls, value: str) -> str:
        return value.strip().lower()

    @property
    def max_delay(self) -> float:
        return self.max_delay_ms / 1000.0

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    @classmethod
    def from_flags(cls, **flags: Any) -> Settings:
        """Settings from the environment, with every flag that was given (not ``None``) on top."""
        return cls(**{k: v for k, v in flags.items() if v is not None})

    # Connection hygiene: slow request heads and the number of open connections (kiln.serve.http_server).
    header_timeout_s: float = Field(
        10.0, gt=0,
        description="a request line + headers not complete this long after the connection opened (or "
        "after the request's first byte on a kept-alive connection) gets 408 and the connection closes"
    )
    max_connections: int | None = Field(
        None, ge=1,
        description="open HTTP connections per process; above it new requests get 503 (health probes "
        "still answered); default: from the open-file limit, at most 8192"
    )
