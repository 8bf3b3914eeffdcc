"""matplotlib helpers (Agg backend: files only, no display) shared by the families' plots."""

from __future__ import annotations

import math
import pathlib
from typing import Any

__all__ = ["grid", "pyplot", "save"]

_DPI = 90


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    pyplot().close(fig)
    return path


def grid(n: int, size: tuple[float, float] = (3.4, 2.7)) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels, at most three per row."""
    plt = pyplot()
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])
