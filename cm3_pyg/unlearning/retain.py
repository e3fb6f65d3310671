"""Forget requests and the retain data they leave (MMRecUn, ``nbpo-and-unlearning.md`` §2).

A :class:`ForgetRequest` names (a) train edges, (b) users, (c) items or (d) one modality of
some items. :func:`build_retain_data` checks it against the data and returns the data with
the forgotten part removed from every structure a model reads:

* edges: gone from the train split (and the reversed edges);
* users: all their train, valid and test edges gone (their rows of every user table are
  reset by the procedure, so nothing they contributed stays in a user row) and their
  external ids blanked;
* items: all their edges gone, their feature rows zeroed in every modality and marked
  removed (``data['item'].keep_<m>``), so the kNN graphs are rebuilt without them, and
  their external ids blanked;
* modality: the items' rows of that modality zeroed and marked removed, that modality's
  kNN graph rebuilt without them; their edges stay.

What a retain dataset differs from its source by is saved as ``retain.pt``
(:func:`save_retain` / :func:`apply_retain`): the three retain splits and the keep masks,
never a forgotten edge or feature row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from cm3_pyg.data.hetero import RATED_BY, RATES, SPLIT_ATTRS
from cm3_pyg.errors import CheckpointError, RequestError
from cm3_pyg.io import atomic_torch_save

__all__ = [
    "REQUEST_KINDS",
    "RETAIN_NAME",
    "ForgetRequest",
    "RetainData",
    "apply_retain",
    "build_retain_data",
    "load_retain",
    "save_retain",
]

REQUEST_KINDS = ("edges", "users", "items", "modality")
#: File name of the retain description inside an unlearned run's folder.
RETAIN_NAME = "retain.pt"
_FORMAT = "cm3_pyg.retain"
_VERSION = 1


@dataclass(frozen=True)
class ForgetRequest:
    """What to forget.

    Attributes:
        kind: one of :data:`REQUEST_KINDS`.
        ids: ``[N]`` user ids (``users``), item ids (``items``, ``modality``), or
            ``[2, N]`` (user, item) train edges (``edges``); internal 0-based ids.
        modality: the modality to forget (``modality`` only).
    """

    kind: str
    ids: Tensor
    modality: str | None = None

    def describe(self) -> dict[str, Any]:
        """The request without its ids (what ``unlearn.json`` records)."""
        count = int(self.ids.size(-1)) if self.ids.dim() else 0
        out: dict[str, Any] = {"kind": self.kind, "count": count}
        if self.modality is not None:
            out["modality"] = self.modality
        return out


@dataclass
class RetainData:
    """The data after a request, and what the procedure needs to know about it.

    Attributes:
        data: the retain dataset.
        forget_edges: ``[2, F]`` the train edges removed (the forget set ``D_f``).
        reset_users: user ids whose rows every user table must lose.
        reset_items: item ids whose rows the item tables must lose.
        modality_index: for a modality request, the modality's position (only tables
            derived from it are reset); ``None`` otherwise.
    """

    data: HeteroData
    forget_edges: Tensor
    reset_users: Tensor
    reset_items: Tensor
    modality_index: int | None = None


def _ids(request: ForgetRequest, bound: int, what: str) -> Tensor:
    ids = request.ids
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise RequestError(
            f"forget {what}: expected a 1-D integer id tensor, got {ids.dtype} {tuple(ids.shape)}"
        )
    ids = ids.long()
    if ids.numel() == 0:
        raise RequestError(f"forget {what}: the request is empty")
    bad = ((ids < 0) | (ids >= bound)).nonzero().flatten()
    if bad.numel():
        raise RequestError(
            f"forget {what}: id {int(ids[bad[0]])} (entry {int(bad[0]) + 1}) is unknown; "
            f"expected ids in [0, {bound})"
        )
    unique, counts = torch.unique(ids, return_counts=True)
    if bool((counts > 1).any()):
        raise RequestError(f"forget {what}: id {int(unique[counts > 1][0])} is listed twice")
    if unique.numel() == bound:
        raise RequestError(
            f"forget {what}: the request names all {bound} {what}; nothing "
            "would be left to recommend from"
        )
    return unique


def _keys(edges: Tensor, num_items: int) -> Tensor:
    return edges[0] * num_items + edges[1]


def _set_splits(data: HeteroData, splits: dict[str, Tensor]) -> None:
    for split, attr in SPLIT_ATTRS.items():
        data[RATES][attr] = splits[split]
    data[RATED_BY].edge_index = splits["train"].flip(0)


def build_retain_data(data: HeteroData, request: ForgetRequest) -> RetainData:
    """Check ``request`` against ``data`` and remove what it names (see the module doc).

    Raises:
        RequestError: an unknown kind or modality, an id out of range, a repeated id, an
            edge that is not a train edge, an empty request, or one that would leave no
            train, valid or test edge (or no user or item).
    """
    if request.kind not in REQUEST_KINDS:
        raise RequestError(
            f"forget request kind {request.kind!r}: expected one of {list(REQUEST_KINDS)}"
        )
    num_users, num_items = int(data["user"].num_nodes), int(data["item"].num_nodes)
    modalities = list(getattr(data, "modalities", []) or [])
    splits = {s: data[RATES][a] for s, a in SPLIT_ATTRS.items()}
    train = splits["train"]
    empty = torch.empty(0, dtype=torch.long)
    reset_users, reset_items, modality_index = empty, empty, None
    features_to_drop: dict[str, Tensor] = {}
    if request.kind == "edges":
        edges = request.ids
        if edges.dim() != 2 or edges.size(0) != 2 or edges.dtype not in (torch.int32, torch.int64):
            raise RequestError(
                f"forget edges: expected a [2, N] integer tensor, got "
                f"{edges.dtype} {tuple(edges.shape)}"
            )
        edges = edges.long()
        if edges.size(1) == 0:
            raise RequestError("forget edges: the request is empty")
        for row, (name, bound) in enumerate((("user", num_users), ("item", num_items))):
            bad = ((edges[row] < 0) | (edges[row] >= bound)).nonzero().flatten()
            if bad.numel():
                raise RequestError(
                    f"forget edges: edge {int(bad[0]) + 1} has {name} id "
                    f"{int(edges[row, bad[0]])}; expected [0, {bound})"
                )
        keys = _keys(edges, num_items)
        unique, counts = torch.unique(keys, return_counts=True)
        if bool((counts > 1).any()):
            key = int(unique[counts > 1][0])
            raise RequestError(
                f"forget edges: edge ({key // num_items}, {key % num_items}) is listed twice"
            )
        unknown = (~torch.isin(keys, _keys(train, num_items))).nonzero().flatten()
        if unknown.numel():
            i = int(unknown[0])
            raise RequestError(
                f"forget edges: edge {i + 1} ({int(edges[0, i])}, "
                f"{int(edges[1, i])}) is not a train interaction"
            )
        forget_mask = torch.isin(_keys(train, num_items), keys)
        new = dict(splits, train=train[:, ~forget_mask])
    elif request.kind == "users":
        users = _ids(request, num_users, "users")
        forget_mask = torch.isin(train[0], users)
        new = {s: e[:, ~torch.isin(e[0], users)] for s, e in splits.items()}
        reset_users = users
    else:
        items = _ids(request, num_items, "items")
        if request.kind == "items":
            forget_mask = torch.isin(train[1], items)
            new = {s: e[:, ~torch.isin(e[1], items)] for s, e in splits.items()}
            reset_items = items
            features_to_drop = {m: items for m in modalities}
        else:
            if request.modality not in modalities:
                raise RequestError(
                    f"forget modality {request.modality!r}: the data has modalities {modalities}"
                )
            forget_mask = torch.zeros(train.size(1), dtype=torch.bool)
            new = dict(splits)
            reset_items = items
            modality_index = modalities.index(request.modality)
            features_to_drop = {request.modality: items}
    for split, edges in new.items():
        if edges.size(1) == 0:
            raise RequestError(f"the request leaves no {split} interaction")
    out = data.clone()
    _set_splits(out, new)
    # Forgotten users and items lose their external ids too (nothing names them any more).
    forgotten = {"user": reset_users, "item": reset_items if request.kind == "items" else empty}
    for node, ids in forgotten.items():
        if ids.numel() and "external_ids" in out[node]:
            names = list(out[node].external_ids)
            for i in ids.tolist():
                names[i] = ""
            out[node].external_ids = names
    for m, items in features_to_drop.items():
        keep = out["item"].get(f"keep_{m}")
        keep = torch.ones(num_items, dtype=torch.bool) if keep is None else keep.clone()
        keep[items] = False
        _drop_rows(out, m, keep)
    return RetainData(out, train[:, forget_mask], reset_users, reset_items, modality_index)


def _drop_rows(data: HeteroData, modality: str, keep: Tensor) -> None:
    """Zero modality ``modality``'s rows outside ``keep`` and record the mask."""
    x = data["item"][f"x_{modality}"].clone()
    x[~keep] = 0
    data["item"][f"x_{modality}"] = x
    data["item"][f"keep_{modality}"] = keep


def save_retain(path: str | os.PathLike[str], data: HeteroData) -> None:
    """Write what ``data`` (a retain dataset) differs from its source by: the three splits
    and the per-modality keep masks (atomically)."""
    keep = {m: data["item"][f"keep_{m}"] for m in data.modalities if f"keep_{m}" in data["item"]}
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "splits": {s: data[RATES][a] for s, a in SPLIT_ATTRS.items()},
        "keep": keep,
    }
    atomic_torch_save(payload, path)


def load_retain(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a :func:`save_retain` file (safe loading, checked layout)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a readable retain file ({reason})") from None
    if not (
        isinstance(obj, dict)
        and obj.get("format") == _FORMAT
        and obj.get("version") == _VERSION
        and set(obj.get("splits", {})) == set(SPLIT_ATTRS)
    ):
        raise CheckpointError(f"{path}: not a cm3_pyg retain file of version {_VERSION}")
    return obj


def apply_retain(data: HeteroData, retain: dict[str, Any]) -> HeteroData:
    """The retain dataset a :func:`load_retain` description makes of its source ``data``."""
    num_items = int(data["item"].num_nodes)
    out = data.clone()
    _set_splits(out, {s: e.long() for s, e in retain["splits"].items()})
    for m, keep in retain["keep"].items():
        if m not in data.modalities or keep.dtype != torch.bool or keep.shape != (num_items,):
            raise CheckpointError(f"retain file: keep mask of {m!r} does not fit the data")
        _drop_rows(out, m, keep)
    return out
