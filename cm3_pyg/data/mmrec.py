"""Reading and validating MMRec-format dataset folders.

An MMRec folder holds ``<name>.inter`` (a whitespace/tab-separated table whose header names
at least ``userID``, ``itemID`` and ``x_label``; ids are 0-based, ``x_label`` is
0 = train, 1 = valid, 2 = test) and any number of ``<modality>_feat.npy`` matrices whose
row ``i`` describes item ``i``.

Every malformed input raises :class:`~cm3_pyg.errors.DataFormatError` naming the file, the
line (1-based, the header is line 1) or field, and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3_pyg.errors import DataFormatError

__all__ = [
    "REQUIRED_COLUMNS",
    "FEATURE_SUFFIX",
    "Interactions",
    "read_interactions",
    "discover_modalities",
    "feature_path",
    "load_features",
]

#: Columns every ``.inter`` file must name in its header (any order, extras ignored).
REQUIRED_COLUMNS: tuple[str, str, str] = ("userID", "itemID", "x_label")
#: File-name suffix of a modality's feature matrix: ``<modality>_feat.npy``.
FEATURE_SUFFIX = "_feat.npy"

# ASCII codes used by the byte-level parser.
_TAB, _LF, _CR, _SPACE, _MINUS, _ZERO = 9, 10, 13, 32, 45, 48
# 18 decimal digits always fit in int64; longer ids are certainly a mistake.
_MAX_DIGITS = 18
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class Interactions:
    """The three required columns of an ``.inter`` file.

    Attributes:
        users: int64 ``[N]`` user ids (0-based).
        items: int64 ``[N]`` item ids (0-based).
        labels: int64 ``[N]`` split labels, 0 = train, 1 = valid, 2 = test.
        path: the file they were read from.
    """

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    path: Path

    def __len__(self) -> int:
        return int(self.users.shape[0])


def _token_text(buf: np.ndarray, start: int, end: int, limit: int = 40) -> str:
    """Decode one token for an error message, shortened to ``limit`` characters."""
    text = buf[start:end].tobytes().decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_header(path: Path, header: bytes) -> tuple[list[str], dict[str, int]]:
    """Split the header line; return its column names and the index of each required one."""
    try:
        columns = header.decode("utf-8").split()
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: line 1 (header) is not valid UTF-8 text ({exc})") from None
    positions: dict[str, int] = {}
    for name in REQUIRED_COLUMNS:
        hits = [j for j, col in enumerate(columns) if col == name]
        if not hits:
            raise DataFormatError(
                f"{path}: line 1 (header) lacks the required column {name!r}; expected a "
                f"tab-separated header naming {', '.join(REQUIRED_COLUMNS)} (any order), "
                f"found {columns!r}"
            )
        if len(hits) > 1:
            raise DataFormatError(
                f"{path}: line 1 (header) names column {name!r} {len(hits)} times; "
                f"expected it once, found {columns!r}"
            )
        positions[name] = hits[0]
    return columns, positions


def _parse_column(
    path: Path,
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    line_numbers: np.ndarray,
    column: str,
) -> np.ndarray:
    """Parse the tokens ``buf[starts[k]:ends[k]]`` as non-negative decimal integers.

    Vectorised over tokens (one pass per digit position) so millions of rows parse in
    well under a second, while any bad token is still located exactly.

    Args:
        buf: uint8 ``[B]`` the file body.
        starts, ends: int64 ``[N]`` token boundaries (``ends`` exclusive).
        line_numbers: int64 ``[N]`` 1-based file line of every token, for messages.

    Returns:
        int64 ``[N]`` values.
    """
    lengths = ends - starts
    values = np.zeros(starts.shape[0], dtype=np.int64)
    bad = lengths > _MAX_DIGITS
    width = int(min(lengths.max(initial=0), _MAX_DIGITS))
    for k in range(width):
        active = lengths > k
        digit = buf[np.where(active, starts + k, 0)].astype(np.int64) - _ZERO
        bad |= active & ((digit < 0) | (digit > 9))
        values = np.where(active, values * 10 + digit, values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        token = _token_text(buf, int(starts[first]), int(ends[first]))
        if token.startswith("-") and token[1:].isdigit():
            what = "a non-negative id" if column != "x_label" else "a label in {0, 1, 2}"
        else:
            what = "an integer" if lengths[first] <= _MAX_DIGITS else "an integer below 1e18"
        raise DataFormatError(
            f"{path}: line {int(line_numbers[first])}, column {column!r}: expected {what}, "
            f"got {token!r}"
        )
    return values


def read_interactions(path: str | os.PathLike[str]) -> Interactions:
    """Read and validate an MMRec ``.inter`` file.

    The header is parsed by hand; the body is tokenised and parsed with vectorised numpy
    on its raw bytes, so ~2M rows take about a second and every error can still point at
    its line. Fields are separated by tabs (any run of spaces/tabs is accepted); blank
    lines are skipped; columns other than the three required ones are ignored and may
    hold anything.

    Args:
        path: the ``.inter`` file.

    Returns:
        :class:`Interactions` with int64 ``[N]`` arrays, in file order.

    Raises:
        DataFormatError: missing file, bad header, a row with the wrong number of fields, a
            value that is not a non-negative integer, a label outside {0, 1, 2}, or no
            train (``x_label == 0``) rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: interaction file not found (expected an MMRec .inter file)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read interaction file ({exc})") from None
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    header_end = raw.find(b"\n")
    header = raw if header_end < 0 else raw[:header_end]
    if not header.strip():
        raise DataFormatError(
            f"{path}: line 1 is empty; expected a header naming {', '.join(REQUIRED_COLUMNS)}"
        )
    columns, positions = _parse_header(path, header)
    num_columns = len(columns)

    body = b"" if header_end < 0 else raw[header_end + 1 :]
    buf = np.frombuffer(body, dtype=np.uint8)
    is_space = (buf == _TAB) | (buf == _SPACE) | (buf == _CR) | (buf == _LF)
    solid = ~is_space
    # A token starts where a non-space byte follows a space (or the start) and ends
    # where it is followed by one (or the end).
    edge = np.diff(solid.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edge == 1)
    ends = np.flatnonzero(edge == -1)
    newlines = np.flatnonzero(buf == _LF)
    # Body line index of every token; +2 turns it into a 1-based file line number.
    token_line = np.searchsorted(newlines, starts)
    per_line = np.bincount(token_line, minlength=newlines.shape[0] + 1)
    wrong = np.flatnonzero((per_line != 0) & (per_line != num_columns))
    if wrong.shape[0]:
        line = int(wrong[0])
        raise DataFormatError(
            f"{path}: line {line + 2} has {int(per_line[line])} fields; expected "
            f"{num_columns} (one per header column: {columns!r})"
        )
    num_rows = starts.shape[0] // num_columns
    starts = starts.reshape(num_rows, num_columns)
    ends = ends.reshape(num_rows, num_columns)
    row_lines = token_line[::num_columns] + 2

    parsed = {
        name: _parse_column(path, buf, starts[:, j], ends[:, j], row_lines, name)
        for name, j in positions.items()
    }
    labels = parsed["x_label"]
    bad_label = np.flatnonzero(labels > 2)
    if bad_label.shape[0]:
        k = int(bad_label[0])
        raise DataFormatError(
            f"{path}: line {int(row_lines[k])}, column 'x_label': expected 0 (train), "
            f"1 (valid) or 2 (test), got {int(labels[k])}"
        )
    if not np.any(labels == 0):
        raise DataFormatError(
            f"{path}: the train split is empty; expected at least one row with x_label 0 "
            f"(found {num_rows} rows)"
        )
    return Interactions(users=parsed["userID"], items=parsed["itemID"], labels=labels, path=path)


def discover_modalities(folder: str | os.PathLike[str]) -> list[str]:
    """Names ``m`` of every ``<m>_feat.npy`` in ``folder``.

    Sorted alphabetically except that ``image`` comes first when present (the reference
    implementations treat the visual modality as modality 0).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: dataset folder not found (expected a directory)")
    names = sorted(
        p.name[: -len(FEATURE_SUFFIX)]
        for p in folder.iterdir()
        if p.name.endswith(FEATURE_SUFFIX) and len(p.name) > len(FEATURE_SUFFIX) and p.is_file()
    )
    if "image" in names:
        names.remove("image")
        names.insert(0, "image")
    return names


def feature_path(folder: str | os.PathLike[str], modality: str) -> Path:
    """Path of a modality's feature matrix: ``<folder>/<modality>_feat.npy``."""
    return Path(folder) / f"{modality}{FEATURE_SUFFIX}"


def _load_one(path: Path) -> np.ndarray:
    """Load one feature matrix as float32 ``[rows, dim]``, validating it fully."""
    if not path.is_file():
        raise DataFormatError(f"{path}: feature file not found (expected a .npy matrix)")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        # Truncated files, pickled object arrays and non-.npy content all end up here.
        raise DataFormatError(
            f"{path}: not a valid .npy file of numbers ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(array, np.ndarray):
        array.close()  # an .npz archive opened lazily
        raise DataFormatError(f"{path}: expected a single .npy array, found an .npz archive")
    if array.ndim != 2:
        raise DataFormatError(
            f"{path}: expected a 2-D matrix [num_items, dim], found shape {tuple(array.shape)}"
        )
    kind = array.dtype.kind
    if kind not in "iuf":
        raise DataFormatError(
            f"{path}: expected real numbers (float or int), found dtype {array.dtype}"
        )
    if array.shape[1] == 0:
        raise DataFormatError(
            f"{path}: expected at least one feature column, found shape {tuple(array.shape)}"
        )
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
        array = np.ascontiguousarray(array, dtype=np.float32)
    # Checked after the cast so values too large for float32 are caught as well.
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DataFormatError(
            f"{path}: row {row} (item {row}) holds NaN/Inf (or a value beyond float32 range); "
            f"expected finite numbers"
        )
    return array


def load_features(
    folder: str | os.PathLike[str],
    modalities: Sequence[str],
    num_items: int | None = None,
) -> dict[str, np.ndarray]:
    """Load and validate the feature matrix of each modality.

    Args:
        folder: the dataset folder.
        modalities: names ``m`` of the ``<m>_feat.npy`` files to load, in fusion order.
        num_items: when given, every matrix needs at least this many rows (the
            interactions reference items ``0 .. num_items - 1``).

    Returns:
        ``{m: float32 [I, d_m]}`` in the order of ``modalities``; all share the same ``I``.

    Raises:
        DataFormatError: a missing, unreadable or non-2-D file, a non-numeric dtype,
            NaN/Inf values, or row counts that differ between modalities or fall short of
            ``num_items``.
    """
    folder = Path(folder)
    if len(set(modalities)) != len(modalities):
        raise DataFormatError(f"modalities: expected distinct names, got {list(modalities)!r}")
    out: dict[str, np.ndarray] = {}
    first: tuple[Path, int] | None = None
    for modality in modalities:
        path = feature_path(folder, modality)
        array = _load_one(path)
        rows = int(array.shape[0])
        if first is not None and rows != first[1]:
            raise DataFormatError(
                f"{path}: has {rows} rows but {first[0]} has {first[1]}; expected every "
                f"modality to have one row per item"
            )
        if num_items is not None and rows < num_items:
            raise DataFormatError(
                f"{path}: has {rows} rows but the interactions reference {num_items} items "
                f"(ids 0..{num_items - 1}); expected one row per item id"
            )
        first = first or (path, rows)
        out[modality] = array
    return out
