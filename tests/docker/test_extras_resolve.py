"""The documented install combinations resolve: `pip install --dry-run` of each against the package index,
with the pinned torch where the combination trains or exports.

TensorRT's PyPI packages are stubs whose library and bindings wheels come from NVIDIA's own index
(pypi.nvidia.com). Where that index cannot be reached (this project's CI machine), local stand-in wheels
of the same name and version take their place, declaring the dependencies NVIDIA's packaging gives them
(``tensorrt_cuNN_libs``: ``cuda-toolkit[cudart]>=NN,<NN+1``; ``tensorrt_cuNN_bindings``: none; see
python/packaging in NVIDIA/TensorRT), so everything else still resolves for real. Slow: minutes per
combination on a loaded machine. Skips when PyPI itself cannot be reached.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PINNED_TORCH = "torch==2.14.1"  # the Makefile's pin: what `.[train]` / `.[export]` resolve beside
# What docs/runtime.md documents (extras, CUDA major of the TensorRT and bindings they bring).
COMBINATIONS = [("serve,trt", 13), ("export,trt", 13), ("serve,trt-cu12", 12)]

pytestmark = pytest.mark.slow


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=15):
            return True
    except (OSError, ValueError):
        return False


def _pip(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True,
                          text=True, timeout=timeout)


def _extra_requirements(extra: str) -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: kiln-tests\nRoot-Is-Purelib: true\nTag: "
                         "py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(text)}")
        whl.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")


def _stand_ins(extra: str, folder: Path) -> list[str]:
    """Stand-in library and bindings wheels for the TensorRT version the extra resolves to; returns that
    version pinned (``tensorrt-cuNN==V``), so pip cannot backtrack to a release without stand-ins."""
    pins = []
    for req in _extra_requirements(extra):
        if not (m := re.match(r"tensorrt-cu(\d+)", req)):
            continue
        cuda = int(m.group(1))
        proc = _pip("install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet", "--report", "-",
                    req)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (item,) = json.loads(proc.stdout)["install"]
        version = item["metadata"]["version"]
        _wheel(folder, f"tensorrt_cu{cuda}_libs", version, [f"cuda-toolkit[cudart]<{cuda + 1},>={cuda}"])
        _wheel(folder, f"tensorrt_cu{cuda}_bindings", version, [])
        pins.append(f"tensorrt-cu{cuda}=={version}")
    return pins


@pytest.fixture(scope="module")
def nvidia_index() -> bool:
    if not _reachable("https://pypi.org/simple/cuda-python/"):
        pytest.skip("PyPI is not reachable: the extras cannot be resolved here")
    try:
        socket.getaddrinfo("pypi.nvidia.com", 443)
    except OSError:
        return False
    return _reachable("https://pypi.nvidia.com/")


@pytest.mark.parametrize(("extras", "cuda"), COMBINATIONS)
def test_documented_extras_resolve(extras: str, cuda: int, nvidia_index: bool, tmp_path: Path) -> None:
    args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report",
            str(tmp_path / "report.json")]
    if not nvidia_index:
        pins = [pin for extra in extras.split(",") for pin in _stand_ins(extra, tmp_path)]
        (tmp_path / "pins.txt").write_text("".join(f"{pin}\n" for pin in pins))
        args += ["--find-links", str(tmp_path), "--constraint", str(tmp_path / "pins.txt")]
    wants_torch = bool({"train", "export"} & set(extras.split(",")))
    proc = _pip(*args, f"{ROOT}[{extras}]", *([PINNED_TORCH] if wants_torch else []))
    assert proc.returncode == 0, f".[{extras}] does not resolve:\n" + proc.stderr[-4000:]
    installed = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                 for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    # One CUDA major for TensorRT, the bindings and (where present) torch's CUDA packages.
    assert f"tensorrt-cu{cuda}" in installed
    assert installed["cuda-bindings"].split(".")[0] == str(cuda)
    assert installed["cuda-python"].split(".")[0] == str(cuda)
    if wants_torch:
        assert installed["torch"] == PINNED_TORCH.split("==")[1]
