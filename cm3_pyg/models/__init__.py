"""Recommender models, one module each, with a registry by name."""

from __future__ import annotations

from cm3_pyg.models.base import GraphInputs, Recommender
from cm3_pyg.models.cm3 import CM3, CM3Output

MODELS: dict[str, type[Recommender]] = {cls.name: cls for cls in (CM3,)}


def get_model_class(name: str) -> type[Recommender]:
    """The model class registered as ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in MODELS:
        raise KeyError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    return MODELS[key]


__all__ = ["CM3", "CM3Output", "GraphInputs", "MODELS", "Recommender", "get_model_class"]
