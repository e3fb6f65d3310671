"""Bring your own data: an interactions table (any string ids) in, an MMRec folder out.

:func:`prepare_dataset` reads a CSV/TSV of interactions with a user column, an item column
and optionally a timestamp, drops repeated (user, item) pairs (keeping the earliest),
optionally keeps the k-core, numbers users and items from 0 in order of first appearance
(written as ``u_id_mapping.csv`` / ``i_id_mapping.csv``), splits every user's interactions
8:1:1 (MMRec's random per-user split, seeded, or by time), and writes feature files:

* ``text_feat.npy`` from item text columns of an items table, through the packaged
  all-MiniLM-L6-v2 (:class:`~cm3_pyg.data.text.SentenceEncoder`);
* ``<name>_feat.npy`` from numeric columns of the items table, or from an existing ``.npy``
  whose rows follow the items table's rows.

The folder is written beside its destination and renamed into place: complete or absent.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cm3_pyg.data.mmrec import NPY_LOAD_ERRORS
from cm3_pyg.data.synthetic import per_user_split_labels
from cm3_pyg.errors import ConfigError, DataFormatError
from cm3_pyg.io import atomic_folder, atomic_write, atomic_write_text

__all__ = ["PrepareOptions", "prepare_dataset", "read_table"]

SPLITS = ("random", "temporal")


@dataclass
class PrepareOptions:
    """What :func:`prepare_dataset` does.

    Attributes:
        user_col, item_col: the interactions table's id columns.
        time_col: its timestamp column (numbers), needed by ``split="temporal"``.
        split: ``random`` (per user, seeded) or ``temporal`` (per user, oldest train).
        ratios: (valid, test) fractions of each user's interactions.
        kcore: keep only users and items with at least this many interactions (repeated
            until stable); ``0``/``1`` keeps everything.
        seed: the random split's seed.
        items: an items table (one row per item) for text / numeric features.
        item_id_col: its item id column.
        text_cols: its columns joined (". ") into each item's text.
        numeric_cols: its columns written as the ``numeric_name`` modality.
        numeric_name: name of that modality.
        features: ``{modality: .npy path}`` arrays whose rows follow the items table.
        sep: column separator (default: tab for ``.tsv``/``.inter``, else comma).
    """

    user_col: str
    item_col: str
    time_col: str | None = None
    split: str = "random"
    ratios: tuple[float, float] = (0.1, 0.1)
    kcore: int = 0
    seed: int = 999
    items: str | os.PathLike[str] | None = None
    item_id_col: str | None = None
    text_cols: Sequence[str] = ()
    numeric_cols: Sequence[str] = ()
    numeric_name: str = "numeric"
    features: Mapping[str, str | os.PathLike[str]] = field(default_factory=dict)
    sep: str | None = None


def _separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        return "\t" if sep in ("tab", "\\t") else sep
    return "\t" if path.suffix.lower() in (".tsv", ".inter", ".item", ".user", ".tab") else ","


def read_table(
    path: str | os.PathLike[str], columns: Sequence[str], sep: str | None = None
) -> dict[str, list[str]]:
    """The named columns of a delimited text file with a header, as lists of strings.

    Raises:
        DataFormatError: a missing or unreadable file, a missing column (the header's
            columns are listed), a row with too few fields or an empty required value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    delimiter = _separator(path, sep)
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DataFormatError(f"{path}: empty file (expected a header row)")
            header = [h.strip() for h in header]
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataFormatError(
                    f"{path}: no column {missing[0]!r}; the header has {header} "
                    f"(separator {delimiter!r})"
                )
            index = [header.index(c) for c in columns]
            out: dict[str, list[str]] = {c: [] for c in columns}
            for line, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) <= max(index):
                    raise DataFormatError(
                        f"{path}: line {line}: {len(row)} fields, expected {len(header)}"
                    )
                for name, i in zip(columns, index, strict=True):
                    out[name].append(row[i].strip())
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read ({exc.strerror})") from None
    return out


def _require_values(path: Path, name: str, values: list[str]) -> None:
    for row, value in enumerate(values):
        if not value:
            raise DataFormatError(f"{path}: line {row + 2}, column {name!r}: empty value")


def _kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Mask of the rows kept by the iterated k-core filter."""
    keep = np.ones(users.shape[0], dtype=bool)
    while True:
        u_count = np.bincount(users[keep], minlength=int(users.max()) + 1)
        i_count = np.bincount(items[keep], minlength=int(items.max()) + 1)
        new = keep & (u_count[users] >= k) & (i_count[items] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def _codes(values: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """0-based codes in order of first appearance, and the names in code order."""
    position: dict[str, int] = {}
    codes = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        codes[row] = position.setdefault(value, len(position))
    return codes, list(position)


def prepare_dataset(
    interactions: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: PrepareOptions,
    encoder: Callable[[Sequence[str]], np.ndarray] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the MMRec folder ``out_dir`` (its name is the dataset's) from ``interactions``.

    Args:
        interactions: the interactions table.
        out_dir: a new folder; ``cm3-pyg train --data-root PARENT --dataset NAME`` reads it.
        options: see :class:`PrepareOptions`.
        encoder: strings -> ``[N, d]`` array for the text modality (default: the packaged
            all-MiniLM-L6-v2).
        progress: progress bars on the long steps.

    Returns:
        A summary (also written as ``prepare.json``): counts, split, modalities.

    Raises:
        DataFormatError: bad input files (the file, line and column are named).
        ConfigError: bad options, or an existing non-empty ``out_dir``.
    """
    path = Path(interactions)
    out = Path(out_dir)
    if options.split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {options.split!r}")
    if options.split == "temporal" and not options.time_col:
        raise ConfigError("a temporal split needs the timestamp column (--time-col)")
    if options.kcore < 0:
        raise ConfigError(f"kcore must be >= 0, got {options.kcore}")
    valid, test = options.ratios
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise ConfigError(f"split ratios (valid, test) must leave some train, got {options.ratios}")
    wants_items = bool(options.text_cols or options.numeric_cols or options.features)
    if wants_items and (options.items is None or not options.item_id_col):
        raise ConfigError("text, numeric or .npy features need --items FILE and --item-id-col")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder; choose a new --out")
    name = out.name

    columns = [options.user_col, options.item_col] + (
        [options.time_col] if options.time_col else []
    )
    table = read_table(path, columns, options.sep)
    for column in (options.user_col, options.item_col):
        _require_values(path, column, table[column])
    n_rows = len(table[options.user_col])
    if n_rows == 0:
        raise DataFormatError(f"{path}: no interaction rows")
    times = np.zeros(n_rows)
    if options.time_col:
        for row, value in enumerate(table[options.time_col]):
            try:
                times[row] = float(value)
            except ValueError:
                raise DataFormatError(
                    f"{path}: line {row + 2}, column {options.time_col!r}: expected a number, "
                    f"got {value!r}"
                ) from None
        if not np.isfinite(times).all():
            row = int(np.flatnonzero(~np.isfinite(times))[0])
            raise DataFormatError(
                f"{path}: line {row + 2}, column {options.time_col!r}: not a finite number"
            )

    raw_users, user_names = _codes(table[options.user_col])
    raw_items, item_names = _codes(table[options.item_col])
    # Repeated (user, item) pairs: keep the earliest (by time, then file order).
    order = np.lexsort((np.arange(n_rows), times, raw_items, raw_users))
    first = np.ones(n_rows, dtype=bool)
    same = (raw_users[order][1:] == raw_users[order][:-1]) & (
        raw_items[order][1:] == raw_items[order][:-1]
    )
    first[order[1:][same]] = False
    keep = first
    if options.kcore > 1:
        keep = keep & _kcore_masked(raw_users, raw_items, keep, options.kcore)
    if not keep.any():
        raise DataFormatError(f"{path}: no interaction is left after the {options.kcore}-core")
    rows = np.flatnonzero(keep)
    users, user_ids = _codes([user_names[u] for u in raw_users[rows]])
    items, item_ids = _codes([item_names[i] for i in raw_items[rows]])
    row_times = times[rows]

    # Group rows by user (ascending), as the split helper expects.
    grouping = np.lexsort((np.arange(rows.size), users))
    users, items, row_times = users[grouping], items[grouping], row_times[grouping]
    counts = np.bincount(users, minlength=len(user_ids))
    labels = per_user_split_labels(
        np.random.default_rng(options.seed),
        users,
        counts,
        options.ratios,
        order_keys=row_times if options.split == "temporal" else None,
    )

    features: dict[str, np.ndarray] = {}
    if wants_items:
        features = _item_features(options, item_ids, encoder, progress)

    with atomic_folder(out) as staging:
        lines = ["userID\titemID\tx_label\n"]
        lines += [f"{u}\t{i}\t{x}\n" for u, i, x in zip(users, items, labels, strict=True)]
        atomic_write_text(staging / f"{name}.inter", "".join(lines))
        for file_name, column, names in (
            ("u_id_mapping.csv", "userID", user_ids),
            ("i_id_mapping.csv", "itemID", item_ids),
        ):
            _check_printable(names, file_name)
            body = "".join(f"{n}\t{i}\n" for i, n in enumerate(names))
            atomic_write_text(staging / file_name, f"external_id\t{column}\n{body}")
        for modality, array in features.items():
            atomic_write(staging / f"{modality}_feat.npy", lambda fh, a=array: np.save(fh, a))
        summary = {
            "source": str(path),
            "users": len(user_ids),
            "items": len(item_ids),
            "interactions": int(rows.size),
            "dropped_repeats": int(n_rows - first.sum()),
            "dropped_by_kcore": int(first.sum() - rows.size),
            "split": options.split,
            "ratios": list(options.ratios),
            "seed": options.seed if options.split == "random" else None,
            "train": int((labels == 0).sum()),
            "valid": int((labels == 1).sum()),
            "test": int((labels == 2).sum()),
            "modalities": {m: list(a.shape) for m, a in features.items()},
        }
        atomic_write_text(staging / "prepare.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _kcore_masked(users: np.ndarray, items: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(users.shape[0], dtype=bool)
    rows = np.flatnonzero(keep)
    mask[rows] = _kcore(users[rows], items[rows], k)
    return mask


def _check_printable(names: Sequence[str], file_name: str) -> None:
    for name in names:
        if any(c in name for c in "\t\r\n"):
            raise DataFormatError(
                f"{file_name}: id {name!r} holds a tab or line break; it cannot be written"
            )


def _item_features(
    options: PrepareOptions,
    item_ids: list[str],
    encoder: Callable[[Sequence[str]], np.ndarray] | None,
    progress: bool,
) -> dict[str, np.ndarray]:
    assert options.items is not None and options.item_id_col
    path = Path(options.items)
    columns = [options.item_id_col, *options.text_cols, *options.numeric_cols]
    columns = list(dict.fromkeys(columns))
    table = read_table(path, columns, options.sep)
    _require_values(path, options.item_id_col, table[options.item_id_col])
    row_of: dict[str, int] = {}
    for row, item in enumerate(table[options.item_id_col]):
        if item in row_of:
            raise DataFormatError(
                f"{path}: line {row + 2}: item {item!r} already on line {row_of[item] + 2}"
            )
        row_of[item] = row
    missing = [i for i in item_ids if i not in row_of]
    if missing:
        raise DataFormatError(
            f"{path}: {len(missing)} of the {len(item_ids)} interacted items have no row "
            f"(first: {missing[0]!r}); every item needs one for its features"
        )
    rows = np.array([row_of[i] for i in item_ids], dtype=np.int64)
    features: dict[str, np.ndarray] = {}
    if options.text_cols:
        texts = [". ".join(v for v in (table[c][r] for c in options.text_cols) if v) for r in rows]
        if encoder is None:
            from cm3_pyg.data.text import SentenceEncoder

            encode = SentenceEncoder().encode
            vectors = encode(texts, progress=progress)
        else:
            vectors = np.asarray(encoder(texts), dtype=np.float32)
        if vectors.shape[0] != len(texts) or vectors.ndim != 2:
            raise ConfigError(f"the text encoder gave shape {vectors.shape} for {len(texts)} texts")
        features["text"] = vectors.astype(np.float32)
    if options.numeric_cols:
        values = np.empty((len(rows), len(options.numeric_cols)), dtype=np.float32)
        for j, column in enumerate(options.numeric_cols):
            for k, r in enumerate(rows):
                raw = table[column][r]
                try:
                    values[k, j] = float(raw)
                except ValueError:
                    raise DataFormatError(
                        f"{path}: line {r + 2}, column {column!r}: expected a number, got {raw!r}"
                    ) from None
        if not np.isfinite(values).all():
            raise DataFormatError(f"{path}: numeric columns hold NaN or Inf")
        features[options.numeric_name] = values
    n_table = len(table[options.item_id_col])
    for modality, npy in options.features.items():
        try:
            array = np.load(npy, allow_pickle=False)
        except NPY_LOAD_ERRORS as exc:
            raise DataFormatError(f"{npy}: not a readable .npy array ({exc})") from None
        if array.ndim != 2 or array.shape[0] != n_table:
            raise DataFormatError(
                f"{npy}: expected a 2-D array with one row per row of {path} ({n_table}), "
                f"got shape {array.shape}"
            )
        if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
            raise DataFormatError(f"{npy}: expected finite numbers, got {array.dtype}")
        features[modality] = array[rows].astype(np.float32)
    return features
