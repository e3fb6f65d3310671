"""Recommender models, one module each, with a registry by name."""

from __future__ import annotations

from cm3_pyg.models.base import GraphInputs, Recommender
from cm3_pyg.models.bm3 import BM3, BM3Losses
from cm3_pyg.models.bprmf import BPRMF
from cm3_pyg.models.cm3 import CM3, CM3Output
from cm3_pyg.models.freedom import FREEDOM
from cm3_pyg.models.lightgcn import LightGCN
from cm3_pyg.models.lirdrec import LIRDRec
from cm3_pyg.models.sea import SEA
from cm3_pyg.models.vbpr import VBPR

MODELS: dict[str, type[Recommender]] = {
    cls.name: cls for cls in (CM3, BPRMF, LightGCN, VBPR, FREEDOM, BM3, LIRDRec, SEA)
}


def get_model_class(name: str) -> type[Recommender]:
    """The model class registered as ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in MODELS:
        raise KeyError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    return MODELS[key]


__all__ = [
    "BM3",
    "BM3Losses",
    "BPRMF",
    "CM3",
    "CM3Output",
    "FREEDOM",
    "GraphInputs",
    "LIRDRec",
    "LightGCN",
    "MODELS",
    "Recommender",
    "SEA",
    "VBPR",
    "get_model_class",
]
