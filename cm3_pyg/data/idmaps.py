"""External ids: the dataset's own user and item ids beside the 0-based ones models use.

MMRec folders may hold ``u_id_mapping.csv`` and ``i_id_mapping.csv``: tab-separated, a
header naming the external column and ``userID`` / ``itemID``, one row per node (baby's:
``user_id  userID`` with Amazon reviewer ids, ``asin  itemID``). :func:`attach_id_maps`
reads them into ``data['user'].external_ids`` / ``data['item'].external_ids`` (a list of
strings, entry ``i`` for internal id ``i``); every node must appear exactly once.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from torch_geometric.data import HeteroData

from cm3_pyg.errors import DataFormatError

__all__ = [
    "ID_MAP_FILES",
    "IdMap",
    "attach_id_maps",
    "external_ids",
    "read_id_map",
]

#: file name and internal-id column per node type
ID_MAP_FILES: dict[str, tuple[str, str]] = {
    "user": ("u_id_mapping.csv", "userID"),
    "item": ("i_id_mapping.csv", "itemID"),
}


class IdMap:
    """External ids of one node type, both ways.

    Args:
        external: entry ``i`` is internal id ``i``'s external id; an empty string marks an
            id that has none (a forgotten user or item of an unlearned run).
    """

    def __init__(self, external: Sequence[str]) -> None:
        self.external: list[str] = [str(e) for e in external]
        self._internal = {e: i for i, e in enumerate(self.external) if e}
        if len(self._internal) != sum(1 for e in self.external if e):
            raise ValueError("external ids must be unique")

    @classmethod
    def identity(cls, count: int) -> IdMap:
        """Internal ids as their own external ids (``"0"``, ``"1"``, ...)."""
        return cls([str(i) for i in range(count)])

    def __len__(self) -> int:
        return len(self.external)

    def __repr__(self) -> str:
        return f"IdMap({len(self)} ids)"

    def __contains__(self, external: object) -> bool:
        return external in self._internal

    def to_internal(self, external: str) -> int:
        """The internal id of ``external``; ``KeyError`` if it has none."""
        return self._internal[external]

    def to_external(self, internal: int) -> str:
        return self.external[internal]


def read_id_map(path: str | os.PathLike[str], id_column: str, count: int) -> IdMap:
    """Read one MMRec id-mapping file for ``count`` nodes.

    Raises:
        DataFormatError: not two tab-separated columns with ``id_column`` among them, an
            internal id that is not an integer in ``[0, count)``, a repeated or empty
            external id, a repeated internal id, or a node without a row.
    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read ({exc.strerror})") from None
    if not rows or len(rows[0]) != 2 or id_column not in rows[0]:
        header = rows[0] if rows else []
        raise DataFormatError(
            f"{path}: expected a header of two tab-separated columns, one named "
            f"{id_column!r}, got {header}"
        )
    internal_col = rows[0].index(id_column)
    external_col = 1 - internal_col
    external: list[str | None] = [None] * count
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise DataFormatError(f"{path}: line {line}: expected 2 fields, got {len(row)}")
        name, raw = row[external_col].strip(), row[internal_col].strip()
        try:
            index = int(raw)
        except ValueError:
            raise DataFormatError(
                f"{path}: line {line}, column {id_column!r}: expected an integer, got {raw!r}"
            ) from None
        if not 0 <= index < count:
            raise DataFormatError(
                f"{path}: line {line}, column {id_column!r}: {index} is not an id of the "
                f"dataset's {count} nodes"
            )
        if not name:
            raise DataFormatError(f"{path}: line {line}: empty external id")
        if external[index] is not None:
            raise DataFormatError(f"{path}: line {line}: {id_column} {index} listed twice")
        if name in seen:
            raise DataFormatError(
                f"{path}: line {line}: external id {name!r} already maps to {seen[name]}"
            )
        external[index], seen[name] = name, index
    missing = [i for i, e in enumerate(external) if e is None]
    if missing:
        raise DataFormatError(
            f"{path}: {len(missing)} of {count} ids have no row (first: {missing[0]})"
        )
    return IdMap([e for e in external if e is not None])


def attach_id_maps(data: HeteroData, folder: str | os.PathLike[str]) -> HeteroData:
    """Set ``data[node].external_ids`` from the folder's mapping files that exist."""
    for node, (file_name, column) in ID_MAP_FILES.items():
        path = Path(folder) / file_name
        if path.is_file():
            count = int(data[node].num_nodes)
            data[node].external_ids = read_id_map(path, column, count).external
    return data


def external_ids(data: HeteroData, node: str) -> IdMap:
    """The node type's id map: the dataset's external ids, else the internal ids."""
    store = data[node]
    if "external_ids" in store:
        return IdMap(store.external_ids)
    return IdMap.identity(int(store.num_nodes))
