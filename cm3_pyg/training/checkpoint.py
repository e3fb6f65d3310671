"""Crash-safe training checkpoints: atomic saving, safe validated loading, resume checks.

A checkpoint (``<out>/checkpoint.pt``, rewritten after every epoch) is a plain dict of
tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``: reading one never runs code. It holds::

    format, version        "cm3_pyg.checkpoint", CHECKPOINT_VERSION
    model, dataset          names of the run's model and dataset
    config                  the run's full configuration
    data_fingerprint        sha256 of the graph inputs and splits the run trained on
    trainer                 Trainer.state_dict(): epoch, model, optimizer, inner
                            optimizers (by inner problem name), RNG states
                            (python, numpy, torch, CUDA and the trainer's generator),
                            early stopping, best valid/test, history
    checksum                cm3_pyg.io.content_digest of all the above, verified on load
                            (a flipped byte in an optimiser moment is an error, not a
                            silently different resumed run)

Every problem with a checkpoint raises :class:`~cm3_pyg.errors.CheckpointError` naming the
file and what is wrong.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cm3_pyg.errors import CheckpointError
from cm3_pyg.io import atomic_torch_save, content_digest
from cm3_pyg.models.base import GraphInputs
from cm3_pyg.training.inputs import Splits

__all__ = [
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "RESUME_MAY_CHANGE",
    "TRAINER_STATE_KEYS",
    "capture_rng_state",
    "check_resumable",
    "data_fingerprint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

#: File name of the checkpoint inside a run's output folder.
CHECKPOINT_NAME = "checkpoint.pt"
#: Bump when the layout changes; older checkpoints are then refused with a clear message.
CHECKPOINT_VERSION = 3  # 2: inner optimisers (SEA's CLUB); 3: a content checksum
#: versions still read (2 has no checksum to verify)
_READABLE_VERSIONS = (2, 3)
_FORMAT = "cm3_pyg.checkpoint"
#: Config keys that may differ between the checkpoint and the resumed run.
RESUME_MAY_CHANGE: frozenset[str] = frozenset({"epochs"})
#: Keys of :meth:`Trainer.state_dict` (checked on load).
TRAINER_STATE_KEYS: tuple[str, ...] = (
    "epoch",
    "model",
    "optimizer",
    "inner_optimizers",
    "generator",
    "rng",
    "early_stopping",
    "best_valid",
    "best_test",
    "history",
    "stopped_early",
)
_TOP_LEVEL: dict[str, type] = {
    "model": str,
    "dataset": str,
    "config": dict,
    "data_fingerprint": str,
    "trainer": dict,
}


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy and torch (CPU and CUDA), weights_only-safe."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "python": random.getstate(),
        # NumPy's state holds an ndarray, which weights_only loading refuses: store a tensor.
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- identity


def data_fingerprint(inputs: GraphInputs, splits: Splits) -> str:
    """sha256 of what a run trains on (sizes, modalities, features and the three splits).

    Stored in the checkpoint so that resuming on different data is refused even when the
    shapes happen to match.
    """
    h = hashlib.sha256()
    h.update(f"{inputs.num_users}|{inputs.num_items}|{inputs.modalities!r}\n".encode())
    tensors = [*inputs.features, splits.train, splits.valid, splits.test]
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- files


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: str,
    dataset: str,
    config: Mapping[str, Any],
    data_fingerprint: str,
    trainer: Mapping[str, Any],
) -> None:
    """Write a checkpoint atomically (a crash mid-write leaves the previous one intact)."""
    payload = {
        "format": _FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model,
        "dataset": dataset,
        "config": dict(config),
        "data_fingerprint": data_fingerprint,
        "trainer": dict(trainer),
    }
    payload["checksum"] = content_digest(payload)
    atomic_torch_save(payload, path)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and structurally validate a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated or not a torch file, holds objects
            that need unpickling code, is not a cm3_pyg checkpoint, has another version, or
            lacks a key (or has one of the wrong type).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found (a run writes {CHECKPOINT_NAME} into its output "
            f"folder after every epoch)"
        )
    try:
        # weights_only: tensors and plain containers only; a crafted file cannot run code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zips, garbage, disallowed globals, ...
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            f"expected a file written by cm3_pyg training"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise CheckpointError(
            f"{path}: not a cm3_pyg checkpoint (expected a dict with format={_FORMAT!r}, "
            f"found {type(obj).__name__})"
        )
    if obj.get("version") not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint version {obj.get('version')!r} is not supported; expected "
            f"{CHECKPOINT_VERSION}"
        )
    for key, kind in _TOP_LEVEL.items():
        if key not in obj:
            raise CheckpointError(f"{path}: checkpoint lacks the key {key!r}")
        if not isinstance(obj[key], kind):
            raise CheckpointError(
                f"{path}: checkpoint key {key!r} should be a {kind.__name__}, found "
                f"{type(obj[key]).__name__}"
            )
    missing = [k for k in TRAINER_STATE_KEYS if k not in obj["trainer"]]
    if missing:
        raise CheckpointError(f"{path}: checkpoint's trainer state lacks the key(s) {missing}")
    if obj["version"] >= 3:
        stored = obj.pop("checksum", None)
        try:
            actual = content_digest(obj)
        except TypeError as exc:
            message = f"{path}: checkpoint holds an unexpected object ({exc})"
            raise CheckpointError(message) from None
        if stored != actual:
            raise CheckpointError(
                f"{path}: checksum mismatch: the checkpoint is corrupt or was edited "
                "(the previous epoch's checkpoint is gone; start a fresh run)"
            )
    return obj


def check_resumable(
    checkpoint: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    model: str,
    dataset: str,
    config: Mapping[str, Any],
    data_fingerprint: str,
) -> None:
    """Refuse to resume a checkpoint into a run that differs in anything but ``epochs``.

    Raises:
        CheckpointError: listing every differing config key (checkpoint vs requested
            value), or naming a different model, dataset or data content.
    """
    if checkpoint["model"] != model:
        raise CheckpointError(
            f"{path}: cannot resume: the checkpoint trained model {checkpoint['model']!r}, "
            f"the requested run is {model!r}"
        )
    if checkpoint["dataset"] != dataset:
        raise CheckpointError(
            f"{path}: cannot resume: the checkpoint trained on dataset "
            f"{checkpoint['dataset']!r}, the requested run uses {dataset!r}"
        )
    saved: Mapping[str, Any] = checkpoint["config"]
    missing = object()
    diffs = [
        f"{key}: checkpoint {saved.get(key, '<unset>')!r}, requested {config.get(key, '<unset>')!r}"
        for key in sorted(set(saved) | set(config))
        if key not in RESUME_MAY_CHANGE and saved.get(key, missing) != config.get(key, missing)
    ]
    if diffs:
        allowed = ", ".join(sorted(RESUME_MAY_CHANGE))
        raise CheckpointError(
            f"{path}: cannot resume: the requested configuration differs from the "
            f"checkpoint's in {'; '.join(diffs)} (only {allowed} may change when resuming; "
            f"pass the original settings, e.g. with --set KEY=VALUE)"
        )
    if checkpoint["data_fingerprint"] != data_fingerprint:
        raise CheckpointError(
            f"{path}: cannot resume: the data differ from the data the checkpoint was trained "
            f"on (users, items, features or splits changed)"
        )
