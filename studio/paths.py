"""Every path the studio touches is confined to the workspace and the data roots."""

from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError


class PathRefused(KilnError):
    """A path outside the allowed roots (or that leaves them through a link)."""


def confine(text: str | Path, roots: tuple[Path, ...], *, base: Path | None = None) -> Path:
    """``text`` resolved (links followed, relative to ``base`` or the first root) if it lies under one
    of ``roots``; otherwise :class:`PathRefused`."""
    raw = Path(str(text)).expanduser()
    if "\x00" in str(text):
        raise PathRefused("path contains a NUL byte")
    path = (raw if raw.is_absolute() else (base or roots[0]) / raw).resolve()
    for root in roots:
        if path == root or path.is_relative_to(root):
            return path
    raise PathRefused(
        f"{text}: outside the folders this studio may read ({', '.join(str(r) for r in roots)})")


def relative_to_any(path: Path, roots: tuple[Path, ...]) -> str:
    for root in roots:
        if path.is_relative_to(root):
            return str(path.relative_to(root)) or "."
    return str(path)
