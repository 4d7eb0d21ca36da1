"""The studio's settings: where it may read and write, where it listens, and its token."""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import ConfigError
from kiln.serve.settings import Settings as ServeSettings

TOKEN_ENV = "KILN_STUDIO_TOKEN"
# uploads are held to kiln serve's default limits
_SERVING = {name: ServeSettings.model_fields[name].default
            for name in ("max_body_bytes", "max_image_pixels", "max_images_per_request")}
STATE_DIR = ".studio"  # inside the workspace: studio.db, job logs, the dataset list


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class StudioConfig:
    """``workspace`` holds runs and the studio's state; datasets are read from ``data_roots`` (and the
    workspace). A ``token`` is required on any non-loopback ``host``; with one, every API call carries it."""

    workspace: Path
    data_roots: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    max_upload_bytes: int = _SERVING["max_body_bytes"]
    max_image_pixels: int = _SERVING["max_image_pixels"]
    max_images: int = _SERVING["max_images_per_request"]
    extra_env: dict[str, str] = field(default_factory=dict)  # for the subprocesses (tests set threads)

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(f"--host {self.host} is reachable from other machines: give a token with "
                              f"--token or {TOKEN_ENV} (every API call must then carry it)")
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("--token: use at least 8 characters")
        for root in (self.workspace, *self.data_roots):
            if not root.is_absolute():
                raise ConfigError(f"{root}: expected an absolute path")

    @property
    def state_dir(self) -> Path:
        return self.workspace / STATE_DIR

    @property
    def roots(self) -> tuple[Path, ...]:
        """Every folder the studio may read: the workspace and the data roots."""
        return (self.workspace, *self.data_roots)

    @classmethod
    def build(cls, workspace: str | os.PathLike[str], data_roots: list[str] | None = None,
              host: str = "127.0.0.1",
              port: int = 8080, token: str | bool | None = None, **kw: object) -> StudioConfig:
        """Resolved folders (created if missing: the workspace; required to exist: data roots); ``token``
        True makes a random one, None reads KILN_STUDIO_TOKEN."""
        ws = Path(workspace).expanduser().resolve()
        ws.mkdir(parents=True, exist_ok=True)
        roots = []
        for r in data_roots or []:
            p = Path(r).expanduser().resolve()
            if not p.is_dir():
                raise ConfigError(f"--data-root {r}: not a folder")
            roots.append(p)
        if token is True:
            token = secrets.token_urlsafe(24)
        elif token is None or token is False:
            token = os.environ.get(TOKEN_ENV) or None
        return cls(ws, tuple(roots), host, port, token, **kw)  # type: ignore[arg-type]
