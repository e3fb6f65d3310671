"""Loading a dataset by name: an MMRec folder under a data root, or the embedded synthetic data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch_geometric.data import HeteroData

from cm3_pyg.data.dataset import MMRecDataset
from cm3_pyg.data.idmaps import attach_id_maps
from cm3_pyg.data.synthetic import make_synthetic
from cm3_pyg.errors import CM3Error

#: Environment variable naming the folder that holds MMRec datasets.
DATA_ROOT_ENV = "CM3_DATA_ROOT"


def load_dataset(
    data_root: str | None,
    dataset: str | None,
    cache_dir: str | None = None,
    modalities: Sequence[str] | None = None,
    duplicates: str = "warn",
    synthetic_size: tuple[int, int] | None = None,
    inter: str | None = None,
    force_reload: bool = False,
) -> tuple[HeteroData, str]:
    """``(data, name)`` for the command-line entry points.

    ``dataset`` under ``data_root`` (or ``$CM3_DATA_ROOT``) when a dataset is named, else
    the embedded synthetic data (``synthetic_size = (users, items)`` overrides its size).
    ``inter`` picks another ``<inter>.inter`` file of the folder (another split of the
    same graph, e.g. ``baby_diffmm_split``); the returned name is then that stem. The
    folder's id-mapping files, when present, give ``data[node].external_ids``
    (:mod:`cm3_pyg.data.idmaps`). ``force_reload`` rebuilds the processed cache.
    """
    data_root = data_root or (os.environ.get(DATA_ROOT_ENV) if dataset else None)
    if dataset and not data_root:
        raise CM3Error(f"--dataset {dataset} needs --data-root or ${DATA_ROOT_ENV}")
    if data_root and not dataset:
        raise CM3Error("--data-root needs --dataset NAME (a folder under the data root)")
    if inter and not dataset:
        raise CM3Error(f"--inter {inter} needs --dataset NAME (the folder holding it)")
    if inter and (Path(inter).name != inter or inter.endswith(".inter")):
        raise CM3Error(f"--inter: expected a file stem such as baby_diffmm_split, got {inter!r}")
    if dataset:
        folder = MMRecDataset(
            Path(data_root) / dataset,
            name=inter or dataset,
            modalities=modalities,
            cache_dir=cache_dir,
            duplicates=duplicates,
            force_reload=force_reload,
        )
        return attach_id_maps(folder[0], Path(data_root) / dataset), inter or dataset
    if synthetic_size is None:
        return make_synthetic(), "synthetic"
    users, items = synthetic_size
    return make_synthetic(num_users=users, num_items=items), "synthetic"
