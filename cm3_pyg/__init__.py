"""cm3_pyg: CM3 and related multimodal recommenders on PyTorch Geometric.

The everyday entry points, importable from the package root::

    import cm3_pyg

    data, name = cm3_pyg.load_dataset("../shared/data", "tiktok")  # or (None, None): synthetic
    model_cls = cm3_pyg.get_model_class("cm3")                    # cm3_pyg.available_models()
    config = cm3_pyg.load_config(model_cls.default_config(), overrides={"epochs": 5})
    metrics = cm3_pyg.run_experiment(data, "cm3", config, out_dir="runs/t")
    run = cm3_pyg.load_run("runs/t")                              # model, inputs, metrics
    top = run.recommend(torch.tensor([0, 1]), k=20)

Layers, fusion and losses are in :mod:`cm3_pyg.nn`, the models in :mod:`cm3_pyg.models`.
"""

from __future__ import annotations

import importlib
from typing import Any

from cm3_pyg._hugepages import request_huge_pages

# Before any cm3_pyg module imports torch: PyTorch latches this at its first allocation.
request_huge_pages()

__version__ = "0.1.0"

#: Root name -> module that defines it (imported on first use, so ``import cm3_pyg.nn``
#: stays light).
_EXPORTS: dict[str, str] = {
    "load_dataset": "cm3_pyg.data.loading",
    "make_synthetic": "cm3_pyg.data.synthetic",
    "MMRecDataset": "cm3_pyg.data.dataset",
    "available_models": "cm3_pyg.models",
    "get_model_class": "cm3_pyg.models",
    "Recommender": "cm3_pyg.models",
    "GraphInputs": "cm3_pyg.models",
    "load_config": "cm3_pyg.training.config",
    "build_graph_inputs": "cm3_pyg.training.inputs",
    "run_experiment": "cm3_pyg.training.experiment",
    "Trainer": "cm3_pyg.training.trainer",
    "load_run": "cm3_pyg.training.loading",
    "TrainedRun": "cm3_pyg.training.loading",
    "CM3Error": "cm3_pyg.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cm3_pyg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
