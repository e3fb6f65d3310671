"""Recommender models, one module each (plus a YAML beside it), found by name.

Every :class:`~cm3_pyg.models.base.Recommender` subclass with a ``name`` registers itself
when its module is imported; :func:`get_model_class` imports every module of this package
first, so a new model is one file and one YAML here and nothing else to edit. A model
defined elsewhere (a research prototype) registers the same way once its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil

from cm3_pyg.models.base import (
    Batch,
    BatchRows,
    GraphInputs,
    InnerProblem,
    LossTerms,
    Recommender,
    registered_models,
)
from cm3_pyg.models.bm3 import BM3, BM3Losses
from cm3_pyg.models.bprmf import BPRMF
from cm3_pyg.models.cm3 import CM3, CM3Output
from cm3_pyg.models.freedom import FREEDOM
from cm3_pyg.models.lightgcn import LightGCN
from cm3_pyg.models.lirdrec import LIRDRec
from cm3_pyg.models.sea import SEA
from cm3_pyg.models.vbpr import VBPR


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

#: The models of this package by name (taken once at import; see :func:`available_models`).
MODELS = registered_models()


def available_models() -> list[str]:
    """Names of every registered model, this package's and any imported since."""
    return sorted(registered_models())


def get_model_class(name: str) -> type[Recommender]:
    """The model class registered as ``name`` (case-insensitive)."""
    models = registered_models()
    key = name.lower()
    if key not in models:
        raise KeyError(f"unknown model {name!r}; available: {sorted(models)}")
    return models[key]


__all__ = [
    "BM3",
    "BM3Losses",
    "BPRMF",
    "Batch",
    "BatchRows",
    "CM3",
    "CM3Output",
    "FREEDOM",
    "GraphInputs",
    "InnerProblem",
    "LIRDRec",
    "LightGCN",
    "LossTerms",
    "MODELS",
    "Recommender",
    "SEA",
    "VBPR",
    "available_models",
    "get_model_class",
]
