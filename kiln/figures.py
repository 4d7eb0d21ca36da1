"""Figures written to files: an Agg canvas (no display, no pyplot global state) and an atomic save.

A reader of ``bench.png`` or a training curve sees the old file or the new one, never half a PNG, and
plotting works the same on a headless server, in a thread or in a test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from kiln.errors import unknown_choice
from kiln.fsutil import atomic_path


def new_figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure`` on an Agg canvas; ``kwargs`` go to ``Figure`` (figsize, dpi...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (``.png`` when it has none).

    A figure made through pyplot is closed afterwards, so a long run does not accumulate open figures.
    """
    target = Path(path)
    fmt = (target.suffix or ".png").lstrip(".").lower()
    known = fig.canvas.get_supported_filetypes()
    if fmt not in known:
        raise unknown_choice("figure format", fmt, known)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return target
