"""Checks of ``kiln train``'s arguments that need no torch, run before the training loop imports it.

A mistyped ``--model`` or ``--data`` is caught by the parser; this module answers the one question that
otherwise waits for torch and torchvision to load: can ``--pretrained`` weights be had at all? A
torchvision weights file is looked up the way torch.hub stores it (``$TORCH_HOME/hub/checkpoints``),
its URL read from torchvision's own source text (parsed, not imported); when the file is not there and
the download host cannot even be resolved or reached, the run stops at once with one line saying which
file to put where. Whenever this cannot decide (an unusual architecture, a proxy, a slow network), it
says nothing and the full check that loads torch decides.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import socket
import threading
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

from kiln.errors import CheckpointError
from kiln.train.config import TORCHVISION_CLASSIFIERS

DET_PREFIX = "kiln-det-"
CONNECT_TIMEOUT_S = 1.5  # a reachable host answers well within this; a silent one is left to torch's download


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without torch: ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``, else
    ``~/.cache/torch/hub``."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub"


def check_pretrained_offline(model: str | None, pretrained: str | None) -> None:
    """Raise :class:`CheckpointError` when ``--pretrained`` names torchvision weights that are neither in
    torch.hub's cache nor downloadable because their host is unreachable; else return (decided later)."""
    if not model or not pretrained:
        return
    arch = model.removeprefix(DET_PREFIX)
    if arch not in TORCHVISION_CLASSIFIERS:
        return  # timm, kiln's own models, unknown names: the full check names the problem
    url = weights_url(arch, pretrained)
    if url is None:
        return
    folder = torch_hub_dir() / "checkpoints"
    name = url.rsplit("/", 1)[-1]
    if (folder / name).is_file():
        return
    host = urlsplit(url).hostname or ""
    problem = unreachable(host)
    if problem is None:
        return
    raise CheckpointError(
        f"--pretrained: {name} is not in torch.hub's cache ({folder}) and {host} cannot be reached "
        f"({problem}); on a machine with network run: curl -L --create-dirs -o {folder / name} {url} (then "
        f"copy it here), or set TORCH_HOME to a folder holding hub/checkpoints/{name}, or pass the file with "
        "--weights")


def unreachable(host: str, port: int = 443) -> str | None:
    """Why ``host`` cannot be connected to, or None when it can, when a proxy is configured (the proxy
    decides), or when no answer came within :data:`CONNECT_TIMEOUT_S` (a slow network may still work)."""
    if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return None
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup has no timeout of its own
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 0.5)
    return result[0] if result and result[0] and "timed out" not in result[0] else None


def weights_url(arch: str, pretrained: str) -> str | None:
    """The URL of torchvision weights ``pretrained`` (DEFAULT, IMAGENET1K_V2 or
    ResNet50_Weights.IMAGENET1K_V2)
    of builder ``arch``, read from torchvision's source; None when the source does not say it plainly."""
    members = _weights_members(arch)
    key = pretrained.rsplit(".", 1)[-1]
    for _ in range(3):  # DEFAULT = IMAGENET1K_V2: follow the alias
        value = members.get(key)
        if value is None or value.startswith("https://") or value.startswith("http://"):
            return value
        key = value
    return None


@cache
def _weights_members(arch: str) -> dict[str, str]:
    """``{member: url or the member it aliases}`` of the weights enum builder ``arch`` takes, from the
    parsed source of ``torchvision/models/*.py`` (torchvision itself is not imported)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return {}
    for path in sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if f"def {arch}(" not in source:
            continue
        tree = ast.parse(source)
        enum_name = _builder_weights(tree, arch)
        return _enum_members(tree, enum_name) if enum_name else {}
    return {}


def _builder_weights(tree: ast.Module, arch: str) -> str | None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == arch:
            for arg in node.args.kwonlyargs + node.args.args:
                if arg.arg == "weights" and arg.annotation is not None:
                    ann = arg.annotation
                    if isinstance(ann, ast.Subscript):  # Optional[ResNet18_Weights]
                        ann = ann.slice
                    return ann.id if isinstance(ann, ast.Name) else None
    return None


def _enum_members(tree: ast.Module, enum_name: str) -> dict[str, str]:
    members: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name == enum_name):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)):
                continue
            name, value = stmt.targets[0].id, stmt.value
            if isinstance(value, ast.Name):
                members[name] = value.id
            elif isinstance(value, ast.Call):
                for kw in value.keywords:
                    if kw.arg == "url" and isinstance(kw.value,
                                                      ast.Constant) and isinstance(kw.value.value, str):
                        members[name] = kw.value.value
    return members
