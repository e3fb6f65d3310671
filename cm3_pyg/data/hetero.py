"""Arrays -> :class:`~torch_geometric.data.HeteroData`: the one place the layout is defined.

See the layout table in ``docs/architecture.md``. In short::

    data['user'].num_nodes                                  U
    data['item'].num_nodes                                  I
    data['item'][f'x_{m}']                                  float32 [I, d_m]
    data.modalities                                         list[str], fusion order
    data['user', 'rates', 'item'].edge_index                int64 [2, E_train], unique, sorted
    data['user', 'rates', 'item'].valid_edge_index          int64 [2, E_valid]
    data['user', 'rates', 'item'].test_edge_index           int64 [2, E_test]
    data['item', 'rated_by', 'user'].edge_index             int64 [2, E_train], reversed train
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from cm3_pyg.errors import DataFormatError
from cm3_pyg.io import content_digest

__all__ = [
    "USER",
    "ITEM",
    "RATES",
    "RATED_BY",
    "SPLIT_ATTRS",
    "build_hetero_data",
    "content_hash",
    "split_edge_index",
]

USER = "user"
ITEM = "item"
#: Edge type of user -> item interactions (train edges plus the valid/test attributes).
RATES: tuple[str, str, str] = (USER, "rates", ITEM)
#: Edge type of the reversed train edges.
RATED_BY: tuple[str, str, str] = (ITEM, "rated_by", USER)
#: Attribute of ``data[RATES]`` holding each split.
SPLIT_ATTRS: dict[str, str] = {
    "train": "edge_index",
    "valid": "valid_edge_index",
    "test": "test_edge_index",
}


def _as_int_array(values: Any, field: str) -> np.ndarray:
    """Convert a 1-D id/label array (numpy, tensor or sequence) to int64 numpy ``[N]``."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataFormatError(f"{field}: expected a 1-D array, got shape {tuple(array.shape)}")
    if array.shape[0] and array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array % 1 == 0):
            pass  # integral floats (e.g. from a float table) are harmless
        else:
            raise DataFormatError(f"{field}: expected integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.shape[0] and array.min() < 0:
        k = int(np.flatnonzero(array < 0)[0])
        raise DataFormatError(
            f"{field}: expected non-negative values, got {int(array[k])} at position {k}"
        )
    return array


def _as_feature(values: np.ndarray | Tensor, name: str) -> Tensor:
    """Convert one modality's features to a contiguous float32 tensor ``[rows, d]``."""
    tensor = (
        values.detach().cpu()
        if isinstance(values, Tensor)
        else torch.from_numpy(np.ascontiguousarray(np.asarray(values)))
    )
    if tensor.dim() != 2:
        raise DataFormatError(
            f"features[{name!r}]: expected a 2-D matrix [num_items, dim], got shape "
            f"{tuple(tensor.shape)}"
        )
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise DataFormatError(f"features[{name!r}]: expected real numbers, got {tensor.dtype}")
    tensor = tensor.to(torch.float32).contiguous()
    finite = torch.isfinite(tensor).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        raise DataFormatError(f"features[{name!r}]: row {row} holds NaN/Inf; expected finite")
    return tensor


def _check_bound(ids: np.ndarray, bound: int, field: str, count: str) -> None:
    """Raise if any id is ``>= bound``."""
    if ids.shape[0] and int(ids.max()) >= bound:
        k = int(np.flatnonzero(ids >= bound)[0])
        raise DataFormatError(
            f"{field}: id {int(ids[k])} at position {k} is out of range; expected ids below "
            f"{count}={bound}"
        )


def _unique_pairs(users: np.ndarray, items: np.ndarray, num_items: int) -> Tensor:
    """Deduplicate (user, item) pairs and sort them by (user, item).

    Returns:
        int64 ``[2, E]`` edge index.
    """
    keys = np.unique(users * num_items + items)  # sorted, so (user, item) order
    return torch.from_numpy(np.stack([keys // num_items, keys % num_items]))


def build_hetero_data(
    users: np.ndarray | Tensor,
    items: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    features: Mapping[str, np.ndarray | Tensor] | None = None,
    num_users: int | None = None,
    num_items: int | None = None,
) -> HeteroData:
    """Build the HeteroData of one interaction dataset.

    Train edges (label 0) are deduplicated and sorted by (user, item). Following MMRec,
    valid (1) and test (2) rows whose user has no train row are dropped; the rest are
    deduplicated and sorted the same way.

    Args:
        users: int ``[N]`` user ids.
        items: int ``[N]`` item ids.
        labels: int ``[N]`` split labels in {0, 1, 2}.
        features: ``{modality: [I, d_m]}`` item features, in fusion order.
        num_users: ``U``; defaults to max user id + 1.
        num_items: ``I``; defaults to max(max item id + 1, feature rows).

    Returns:
        HeteroData laid out as in ``docs/architecture.md``.

    Raises:
        DataFormatError: mismatched lengths, negative or out-of-range ids, labels outside
            {0, 1, 2}, or features that are not finite 2-D matrices with ``I`` rows.
    """
    users_np = _as_int_array(users, "users")
    items_np = _as_int_array(items, "items")
    labels_np = _as_int_array(labels, "labels")
    if not users_np.shape[0] == items_np.shape[0] == labels_np.shape[0]:
        raise DataFormatError(
            f"users/items/labels: expected equal lengths, got {users_np.shape[0]}, "
            f"{items_np.shape[0]} and {labels_np.shape[0]}"
        )
    if labels_np.shape[0] and int(labels_np.max()) > 2:
        k = int(np.flatnonzero(labels_np > 2)[0])
        raise DataFormatError(
            f"labels: expected 0 (train), 1 (valid) or 2 (test), got {int(labels_np[k])} at "
            f"position {k}"
        )

    feats = {str(m): _as_feature(x, str(m)) for m, x in (features or {}).items()}
    rows = {m: int(x.shape[0]) for m, x in feats.items()}
    if len(set(rows.values())) > 1:
        raise DataFormatError(
            f"features: expected the same number of rows (one per item) in every modality, "
            f"got {rows}"
        )
    feat_rows = next(iter(rows.values())) if rows else None

    max_user = int(users_np.max()) + 1 if users_np.shape[0] else 0
    max_item = int(items_np.max()) + 1 if items_np.shape[0] else 0
    if num_users is None:
        num_users = max_user
    if num_items is None:
        num_items = max(max_item, feat_rows or 0)
    num_users, num_items = int(num_users), int(num_items)
    _check_bound(users_np, num_users, "users", "num_users")
    _check_bound(items_np, num_items, "items", "num_items")
    if feat_rows is not None and feat_rows != num_items:
        raise DataFormatError(
            f"features: expected {num_items} rows (num_items), got {feat_rows} rows"
        )

    train = labels_np == 0
    train_index = _unique_pairs(users_np[train], items_np[train], max(num_items, 1))
    has_train = np.zeros(num_users, dtype=bool)
    has_train[users_np[train]] = True

    data = HeteroData()
    data[USER].num_nodes = num_users
    data[ITEM].num_nodes = num_items
    for modality, x in feats.items():
        data[ITEM][f"x_{modality}"] = x
    data.modalities = list(feats)
    data[RATES].edge_index = train_index
    for label, split in ((1, "valid"), (2, "test")):
        # MMRec evaluates only users it can represent, i.e. users with a train row.
        keep = (labels_np == label) & has_train[users_np]
        data[RATES][SPLIT_ATTRS[split]] = _unique_pairs(
            users_np[keep], items_np[keep], max(num_items, 1)
        )
    data[RATED_BY].edge_index = train_index.flip(0)
    return data


def split_edge_index(data: HeteroData, split: str) -> Tensor:
    """The ``[2, E_split]`` user->item edge index of ``split`` in {'train', 'valid', 'test'}."""
    if split not in SPLIT_ATTRS:
        raise ValueError(f"split: expected one of {sorted(SPLIT_ATTRS)}, got {split!r}")
    attr = SPLIT_ATTRS[split]
    # Checked via edge_types first: indexing a missing type would silently create it.
    if RATES not in data.edge_types or attr not in data[RATES]:
        raise DataFormatError(
            f"data[{RATES!r}] has no {attr!r}; expected a HeteroData from build_hetero_data()"
        )
    return data[RATES][attr]


def content_hash(data: HeteroData) -> str:
    """sha256 of a dataset's content: node counts, modalities, every feature table and the
    three splits (not file names, sizes or times), so results computed on it can be reused
    exactly when the content is the same."""
    modalities = list(getattr(data, "modalities", []) or [])
    return content_digest(
        {
            "users": int(data[USER].num_nodes),
            "items": int(data[ITEM].num_nodes),
            "modalities": modalities,
            "features": [data[ITEM][f"x_{m}"] for m in modalities],
            "splits": [data[RATES][attr] for attr in SPLIT_ATTRS.values()],
        }
    )
