"""The trained-run artifact: everything top-K inference needs, in one checked file.

Every run with an output folder writes ``artifact.pt`` whenever validation improves, so it
always holds the best validation epoch (the checkpoint holds the last epoch, for resuming).
It carries the final user and item embeddings (every model here scores by their dot
product), the train interactions to exclude, the items never to recommend (forgotten ones),
the external ids, the model's name and configuration, and a SHA-256 checksum of all of it.
Serving, export and the ``recommend`` command read only this file: no dataset, no model
code, no unpickling (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cm3_pyg.errors import CheckpointError
from cm3_pyg.io import atomic_torch_save, content_digest

__all__ = [
    "ARTIFACT_NAME",
    "ARTIFACT_VERSION",
    "Artifact",
    "load_artifact",
    "save_artifact",
]

#: File name of the artifact inside a run's folder.
ARTIFACT_NAME = "artifact.pt"
ARTIFACT_VERSION = 2  # 2: the checksum is cm3_pyg.io.content_digest
_FORMAT = "cm3_pyg.artifact"


@dataclass
class Artifact:
    """A trained run's inference state.

    Attributes:
        model: the model's registered name.
        dataset: the dataset's name.
        epoch: the epoch the embeddings are from (the best validation epoch).
        valid: that epoch's validation metrics.
        config: the run's configuration.
        user_embeddings: ``[U, D]`` float.
        item_embeddings: ``[I, D]`` float.
        exclude_ptr: ``[U + 1]`` CSR row pointer of the items each user is never
            recommended (their train items).
        exclude_items: ``[E]`` those items, sorted within each user.
        removed_items: ``[I]`` bool, items recommended to nobody (forgotten items).
        user_ids: external id of each user (``""``: none, e.g. a forgotten user).
        item_ids: external id of each item.
    """

    model: str
    dataset: str
    epoch: int
    valid: dict[str, float]
    config: dict[str, Any]
    user_embeddings: Tensor
    item_embeddings: Tensor
    exclude_ptr: Tensor
    exclude_items: Tensor
    removed_items: Tensor
    user_ids: list[str]
    item_ids: list[str]

    @property
    def num_users(self) -> int:
        return int(self.user_embeddings.size(0))

    @property
    def num_items(self) -> int:
        return int(self.item_embeddings.size(0))

    def __repr__(self) -> str:
        return (
            f"Artifact(model={self.model!r}, dataset={self.dataset!r}, epoch={self.epoch}, "
            f"users={self.num_users}, items={self.num_items}, "
            f"dim={int(self.user_embeddings.size(1))})"
        )

    @classmethod
    def build(
        cls,
        *,
        model: str,
        dataset: str,
        epoch: int,
        valid: Mapping[str, float],
        config: Mapping[str, Any],
        user_embeddings: Tensor,
        item_embeddings: Tensor,
        train_edges: Tensor,
        user_ids: Sequence[str] | None = None,
        item_ids: Sequence[str] | None = None,
        removed_items: Tensor | None = None,
    ) -> Artifact:
        """An artifact from embeddings and the ``[2, E]`` (user, item) train edges; ids
        default to the internal ids as strings."""
        num_users, num_items = int(user_embeddings.size(0)), int(item_embeddings.size(0))
        edges = train_edges.detach().cpu().long()
        order = torch.argsort(edges[0] * num_items + edges[1])
        edges = edges[:, order]
        ptr = torch.zeros(num_users + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(torch.bincount(edges[0], minlength=num_users), 0)
        if removed_items is None:
            removed_items = torch.zeros(num_items, dtype=torch.bool)
        return cls(
            model=model,
            dataset=dataset,
            epoch=int(epoch),
            valid={k: float(v) for k, v in valid.items()},
            config=dict(config),
            user_embeddings=user_embeddings.detach().float().cpu().contiguous(),
            item_embeddings=item_embeddings.detach().float().cpu().contiguous(),
            exclude_ptr=ptr,
            exclude_items=edges[1].contiguous(),
            removed_items=removed_items.detach().cpu().bool(),
            user_ids=[str(u) for u in user_ids]
            if user_ids is not None
            else [str(i) for i in range(num_users)],
            item_ids=[str(i) for i in item_ids]
            if item_ids is not None
            else [str(i) for i in range(num_items)],
        )

    def _payload(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": ARTIFACT_VERSION,
            "model": self.model,
            "dataset": self.dataset,
            "epoch": self.epoch,
            "valid": self.valid,
            "config": self.config,
            "user_embeddings": self.user_embeddings,
            "item_embeddings": self.item_embeddings,
            "exclude_ptr": self.exclude_ptr,
            "exclude_items": self.exclude_items,
            "removed_items": self.removed_items,
            "user_ids": self.user_ids,
            "item_ids": self.item_ids,
        }


def _checksum(payload: Mapping[str, Any]) -> str:
    """:func:`cm3_pyg.io.content_digest` of every field but the checksum."""
    return content_digest({k: v for k, v in payload.items() if k != "checksum"})


def save_artifact(artifact: Artifact, path: str | os.PathLike[str]) -> None:
    """Write ``artifact`` to ``path`` atomically, with its checksum."""
    payload = artifact._payload()
    payload["checksum"] = _checksum(payload)
    atomic_torch_save(payload, path)


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "dataset": str,
    "epoch": int,
    "valid": dict,
    "config": dict,
    "user_embeddings": Tensor,
    "item_embeddings": Tensor,
    "exclude_ptr": Tensor,
    "exclude_items": Tensor,
    "removed_items": Tensor,
    "user_ids": list,
    "item_ids": list,
    "checksum": str,
}


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Read and check an artifact (a run folder or the file itself).

    Raises:
        CheckpointError: missing, unreadable, not an artifact, another version, a field
            missing or of the wrong type or shape, or a checksum that does not match.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ARTIFACT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no trained-run artifact (a run writes {ARTIFACT_NAME} into its output "
            "folder at its best validation epoch)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zips, garbage, disallowed globals, ...
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"{path}: not a readable artifact ({type(exc).__name__}: {reason})"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a cm3_pyg artifact (format {_FORMAT!r} expected)")
    if obj.get("version") != ARTIFACT_VERSION:
        raise CheckpointError(
            f"{path}: artifact version {obj.get('version')!r} is not supported; expected "
            f"{ARTIFACT_VERSION}"
        )
    for key, kind in _FIELDS.items():
        if not isinstance(obj.get(key), kind):
            raise CheckpointError(
                f"{path}: artifact field {key!r} missing or not a {kind.__name__}"
            )
    if obj["checksum"] != _checksum(obj):
        raise CheckpointError(f"{path}: checksum mismatch: the artifact is corrupt or edited")
    users, items = obj["user_embeddings"], obj["item_embeddings"]
    num_users, num_items = users.size(0) if users.dim() == 2 else -1, items.size(0)
    ptr, excluded = obj["exclude_ptr"], obj["exclude_items"]
    problems = [
        (users.dim() == 2 and items.dim() == 2 and users.size(1) == items.size(1), "embeddings"),
        (len(obj["user_ids"]) == num_users and len(obj["item_ids"]) == num_items, "id lists"),
        (ptr.numel() == num_users + 1 and int(ptr[-1]) == excluded.numel(), "exclude_ptr"),
        (
            excluded.numel() == 0 or 0 <= int(excluded.min()) <= int(excluded.max()) < num_items,
            "exclude_items",
        ),
        (obj["removed_items"].numel() == num_items, "removed_items"),
    ]
    for ok, name in problems:
        if not ok:
            raise CheckpointError(f"{path}: artifact field {name!r} has inconsistent shapes")
    fields = {k: obj[k] for k in _FIELDS if k != "checksum"}
    return Artifact(**fields)
