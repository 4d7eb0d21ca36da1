"""Where a benchmark ran: CPU and GPU names, library versions, load average, thread settings.

Every figure is printed beside these, so two runs can be compared only when their environments agree.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

from kiln import __version__

VERSIONED = ("kiln", "numpy", "torch", "onnxruntime", "tensorrt")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name() -> str | None:
    """Name of CUDA device 0, or None without a GPU. Asks torch only if it is already imported."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return str(torch.cuda.get_device_name(0))
        except Exception:  # a broken driver must not break a CPU benchmark
            return None
    try:
        # Imported here: the CUDA query module is only worth loading when a report is being written.
        from kiln.runtime import cuda

        if cuda.device_count() > 0:
            return cuda.device_info(0).name
    except Exception:
        return None
    return None


def library_versions(names: Sequence[str] = VERSIONED) -> dict[str, str]:
    """Installed versions of the libraries that decide the numbers; missing ones are left out."""
    out = {"python": platform.python_version()}
    for name in names:
        if name == "kiln":  # the package's own version: the distribution may be named differently
            out[name] = __version__
            continue
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: a busy machine explains a wide p99."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # not available on every platform
        return None


def environment() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "versions": library_versions(),
        "load_average": load_average(),
        "env": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
