"""Optional matplotlib: the one place that imports it and writes figures (atomically)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from cm3_pyg.io import atomic_write

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` when matplotlib,
    an optional dependency (``pip install 'cm3_pyg[plot]'``), is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG to ``path`` (complete or absent) and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))
    return Path(path)
