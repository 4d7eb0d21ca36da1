"""Typed exceptions. The CLI turns every :class:`KilnError` into a one-line message (no traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KilnError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug in kiln."""


class ConfigError(KilnError, ValueError):
    """An option has an invalid value (unknown name, out-of-range number)."""


class DatasetError(KilnError):
    """A dataset is missing, unreadable or malformed."""


class BundleError(KilnError):
    """A bundle folder is missing, incomplete or its kiln.json is invalid."""


class CheckpointError(KilnError):
    """A checkpoint or weights file cannot be read."""


class ExportError(KilnError):
    """Export, verification or calibration failed."""


class BackendUnavailable(KilnError):
    """A runtime backend cannot be used here (library or device missing, artifact incompatible)."""


class InputError(KilnError, ValueError):
    """An inference input does not match the model's input spec."""


def unknown_choice(
    kind: str, value: str, choices: Iterable[str], flag: str | None = None, ordered: bool = False
) -> ConfigError:
    """Build the error for an unknown name, listing the valid ones and suggesting the nearest match.

    ``ordered`` keeps the choices in the given order, for scales such as optimization levels.
    """
    valid = list(choices) if ordered else sorted(choices)
    near = difflib.get_close_matches(value, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    where = f"{flag}: " if flag else ""
    return ConfigError(f"{where}unknown {kind} '{value}'. Valid: {', '.join(valid)}.{hint}")


def install_hint(extra: str) -> str:
    """How to install an optional part of kiln. It installs from its source tree (the distribution is
    kiln-vision; "kiln" on the package index is an unrelated project)."""
    return f"pip install '.[{extra}]' in the kiln checkout"
