"""Atomic file writes: a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
# Files this process creates are newer than this; a pid-less temp file older than it is a leftover.
_PROCESS_START = time.time()
# atomic_path's names: ".<target>.<pid>-<8 random>.tmp", and ".<target>.<8 random>.tmp" from versions
# before the pid was recorded; an ONNX writer may put external weights beside one as "<that>.data".
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?:(?P<pid>\d+)-)?[a-z0-9_]{8}\.tmp(?:\.data)?$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` with one rename.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later run tell a file in use from one left by a killed process.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp", dir=target.parent)
    # mkstemp creates 0600; keep the mode an ordinary open() would give (or the replaced file's).
    try:
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    os.fchmod(fd, mode)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_stale_temps(folder: str | os.PathLike[str], *, recursive: bool = True) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left under ``folder`` when a process was killed.

    Only names of atomic_path's pattern are touched, and only when no live process can still be
    writing them: the recorded pid is gone, or the file is older than that process (the pid was
    reused, as a container's pid 1 is on every start). A name without a pid counts as a leftover when
    it is older than this process. Returns the removed paths.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed: list[Path] = []
    for path in root.rglob(".*.tmp*") if recursive else root.glob(".*.tmp*"):
        match = _TEMP_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        pid = match["pid"]
        if not (_owner_gone(int(pid), mtime) if pid is not None else mtime < _PROCESS_START):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _owner_gone(pid: int, mtime: float) -> bool:
    """True when process ``pid`` cannot be the one writing a file last modified at ``mtime``."""
    if pid == os.getpid():
        return mtime < _PROCESS_START
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = _start_time(pid)
    return started is not None and mtime < started - 1.0  # /proc/stat's boot time is whole seconds


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc says; otherwise None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` atomically through ``writer(binary_file)``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        writer(fh)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
