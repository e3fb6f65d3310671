"""Export a run's embeddings for other tools: ``.npy`` tables plus their id order."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cm3_pyg.errors import ConfigError
from cm3_pyg.io import atomic_folder, atomic_write, atomic_write_text
from cm3_pyg.training.artifact import Artifact

__all__ = ["export_embeddings"]


def export_embeddings(artifact: Artifact, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``user_embeddings.npy`` / ``item_embeddings.npy`` (float32, one row per id),
    ``user_ids.txt`` / ``item_ids.txt`` (the external id of each row, one per line) and
    ``export.json`` (model, dataset, epoch, sizes) into the new folder ``out_dir``.

    Users and items without an external id (forgotten ones) are left out. The folder is
    built beside ``out_dir`` and renamed into place, so it is complete or absent.

    Raises:
        ConfigError: ``out_dir`` exists and is not an empty folder.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder; choose a new --out")
    with atomic_folder(out) as staging:
        summary: dict[str, Any] = {
            "model": artifact.model,
            "dataset": artifact.dataset,
            "epoch": artifact.epoch,
            "dim": int(artifact.user_embeddings.size(1)),
        }
        for node, table, ids in (
            ("user", artifact.user_embeddings, artifact.user_ids),
            ("item", artifact.item_embeddings, artifact.item_ids),
        ):
            keep = [i for i, e in enumerate(ids) if e]
            rows = table.numpy()[keep].astype(np.float32)
            atomic_write(staging / f"{node}_embeddings.npy", lambda fh, a=rows: np.save(fh, a))
            atomic_write_text(staging / f"{node}_ids.txt", "".join(f"{ids[i]}\n" for i in keep))
            summary[f"{node}s"] = len(keep)
        atomic_write_text(staging / "export.json", json.dumps(summary, indent=2) + "\n")
    return summary
