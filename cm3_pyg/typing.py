"""Optional-dependency detection, done once at import time.

Mirrors ``torch_geometric.typing``: code asks ``WITH_TORCH_SPARSE`` instead of importing
optional packages itself, so a missing extra never breaks an import.
"""

from __future__ import annotations

import importlib.util


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _try_import_torch_sparse() -> bool:
    if not _has("torch_sparse"):
        return False
    try:  # the package can be present yet fail to load against this torch build
        import torch_sparse  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


WITH_TORCH_SPARSE: bool = _try_import_torch_sparse()
WITH_TORCH_SCATTER: bool = _has("torch_scatter")
WITH_FAISS: bool = _has("faiss")
WITH_PYG_LIB: bool = _has("pyg_lib")

__all__ = ["WITH_TORCH_SPARSE", "WITH_TORCH_SCATTER", "WITH_FAISS", "WITH_PYG_LIB"]
