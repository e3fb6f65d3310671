"""Reading and validating MMRec-format dataset folders.

An MMRec folder holds ``<name>.inter`` (a whitespace/tab-separated table whose header names
at least ``userID``, ``itemID`` and ``x_label``; ids are 0-based, ``x_label`` is
0 = train, 1 = valid, 2 = test) and any number of ``<modality>_feat.npy`` matrices whose
row ``i`` describes item ``i``.

Every malformed input raises :class:`~cm3_pyg.errors.DataFormatError` naming the file, the
line (1-based, the header is line 1) or row, and what was expected. Each check reports
through a :class:`~cm3_pyg.data.problems.ProblemLog`, so the same checks either stop at the
first error (loading) or collect every problem of a folder (``python -m
cm3_pyg.data.validate``).
"""

from __future__ import annotations

import os
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3_pyg.data.problems import ProblemLog
from cm3_pyg.errors import ConfigError, DataFormatError

__all__ = [
    "DUPLICATE_POLICIES",
    "REQUIRED_COLUMNS",
    "FEATURE_SUFFIX",
    "Interactions",
    "MMRecContents",
    "check_interactions",
    "read_interactions",
    "read_mmrec_folder",
    "scan_features",
    "scan_interactions",
    "discover_modalities",
    "feature_path",
    "load_features",
]

#: Columns every ``.inter`` file must name in its header (any order, extras ignored).
REQUIRED_COLUMNS: tuple[str, str, str] = ("userID", "itemID", "x_label")
#: File-name suffix of a modality's feature matrix: ``<modality>_feat.npy``.
FEATURE_SUFFIX = "_feat.npy"
#: What to do with a repeated (user, item) pair: warn and drop the repeats, or fail.
DUPLICATE_POLICIES: tuple[str, str] = ("warn", "error")
_SPLIT_NAMES = ("train", "valid", "test")

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
        lines: int64 ``[N]`` 1-based file line of each row (for messages), when known.
    """

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    path: Path
    lines: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def line_of(self, row: int) -> int | None:
        """The file line of row ``row`` (``None`` when unknown)."""
        return None if self.lines is None else int(self.lines[row])

    def where(self, row: int) -> str:
        """``"line L"`` (or ``"row k"`` without line numbers) for messages."""
        line = self.line_of(row)
        return f"line {line}" if line is not None else f"row {row}"

    def select(self, rows: np.ndarray) -> Interactions:
        """The rows ``rows`` (a bool mask or indices), keeping the line numbers."""
        return Interactions(
            users=self.users[rows],
            items=self.items[rows],
            labels=self.labels[rows],
            path=self.path,
            lines=None if self.lines is None else self.lines[rows],
        )


@dataclass(frozen=True, eq=False)
class MMRecContents:
    """What :func:`read_mmrec_folder` read: checked interactions and feature matrices.

    Attributes:
        interactions: rows after the duplicate policy was applied.
        features: ``{modality: float32 [I, d_m]}`` in fusion order.
        modalities: the names of ``features``, in order.
    """

    interactions: Interactions
    features: dict[str, np.ndarray]
    modalities: list[str]


# ----------------------------------------------------------------------------- .inter


def _token_text(buf: np.ndarray, start: int, end: int, limit: int = 40) -> str:
    """Decode one token for an error message, shortened to ``limit`` characters."""
    text = buf[start:end].tobytes().decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_header(path: Path, header: bytes, log: ProblemLog) -> tuple[list[str], dict[str, int]]:
    """Split the header line; return its column names and the index of each required one.

    Every missing or repeated required column is reported; ``positions`` then lacks it.
    """
    try:
        columns = header.decode("utf-8").split()
    except UnicodeDecodeError as exc:
        log.error(f"{path}: line 1 (header) is not valid UTF-8 text ({exc})")
        return [], {}
    positions: dict[str, int] = {}
    for name in REQUIRED_COLUMNS:
        hits = [j for j, col in enumerate(columns) if col == name]
        if not hits:
            log.error(
                f"{path}: line 1 (header) lacks the required column {name!r}; expected a "
                f"tab-separated header naming {', '.join(REQUIRED_COLUMNS)} (any order), "
                f"found {columns!r}"
            )
        elif len(hits) > 1:
            log.error(
                f"{path}: line 1 (header) names column {name!r} {len(hits)} times; "
                f"expected it once, found {columns!r}"
            )
        else:
            positions[name] = hits[0]
    return columns, positions


def _parse_column(
    path: Path,
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    line_numbers: np.ndarray,
    column: str,
    log: ProblemLog,
) -> tuple[np.ndarray, np.ndarray]:
    """Parse the tokens ``buf[starts[k]:ends[k]]`` as non-negative decimal integers.

    Vectorised over tokens (one pass per digit position) so millions of rows parse in
    well under a second, while every bad token is still located exactly.

    Args:
        buf: uint8 ``[B]`` the file body.
        starts, ends: int64 ``[N]`` token boundaries (``ends`` exclusive).
        line_numbers: int64 ``[N]`` 1-based file line of every token, for messages.
        log: where bad tokens are reported.

    Returns:
        int64 ``[N]`` values and bool ``[N]`` marking the tokens that are not valid.
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

    def describe(k: int) -> str:
        token = _token_text(buf, int(starts[k]), int(ends[k]))
        if token.startswith("-") and token[1:].isdigit():
            what = "a non-negative id" if column != "x_label" else "a label in {0, 1, 2}"
        else:
            what = "an integer" if lengths[k] <= _MAX_DIGITS else "an integer below 1e18"
        return (
            f"{path}: line {int(line_numbers[k])}, column {column!r}: expected {what}, "
            f"got {token!r}"
        )

    log.rows(
        np.flatnonzero(bad),
        describe,
        lambda n: f"{path}: {n} more lines with an invalid value in column {column!r}",
    )
    return values, bad


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
    out = scan_interactions(Path(path), ProblemLog())
    assert out is not None  # a fail-fast log raises instead
    return out


def scan_interactions(path: Path, log: ProblemLog) -> Interactions | None:
    """:func:`read_interactions` reporting to ``log``.

    With a collecting log every problem is recorded and the rows that parse cleanly are
    returned (``None`` when the file cannot be read at all), so later checks still run.
    """
    if not path.is_file():
        log.error(f"{path}: interaction file not found (expected an MMRec .inter file)")
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        log.error(f"{path}: cannot read interaction file ({exc})")
        return None
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    header_end = raw.find(b"\n")
    header = raw if header_end < 0 else raw[:header_end]
    if not header.strip():
        log.error(
            f"{path}: line 1 is empty; expected a header naming {', '.join(REQUIRED_COLUMNS)}"
        )
        return None
    columns, positions = _parse_header(path, header, log)
    if len(positions) < len(REQUIRED_COLUMNS):
        return None  # without every required column the body cannot be interpreted
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
    wrong = (per_line != 0) & (per_line != num_columns)
    log.rows(
        np.flatnonzero(wrong),
        lambda line: (
            f"{path}: line {line + 2} has {int(per_line[line])} fields; expected "
            f"{num_columns} (one per header column: {columns!r})"
        ),
        lambda n: f"{path}: {n} more lines with the wrong number of fields",
    )
    if wrong.any():  # only reached when collecting: keep the well-formed lines
        keep = ~wrong[token_line]
        starts, ends, token_line = starts[keep], ends[keep], token_line[keep]
    num_rows = starts.shape[0] // num_columns
    starts = starts.reshape(num_rows, num_columns)
    ends = ends.reshape(num_rows, num_columns)
    row_lines = token_line[::num_columns] + 2

    parsed: dict[str, np.ndarray] = {}
    bad_row = np.zeros(num_rows, dtype=bool)
    for name, j in positions.items():
        parsed[name], bad = _parse_column(path, buf, starts[:, j], ends[:, j], row_lines, name, log)
        bad_row |= bad
    labels = parsed["x_label"]
    bad_label = ~bad_row & (labels > 2)
    log.rows(
        np.flatnonzero(bad_label),
        lambda k: (
            f"{path}: line {int(row_lines[k])}, column 'x_label': expected 0 (train), "
            f"1 (valid) or 2 (test), got {int(labels[k])}"
        ),
        lambda n: f"{path}: {n} more lines with an x_label outside {{0, 1, 2}}",
    )
    good = ~(bad_row | bad_label)
    out = Interactions(
        users=parsed["userID"][good],
        items=parsed["itemID"][good],
        labels=labels[good],
        path=path,
        lines=row_lines[good],
    )
    if not np.any(out.labels == 0):
        log.error(
            f"{path}: the train split is empty; expected at least one row with x_label 0 "
            f"(found {len(out)} rows)"
        )
        return None
    return out


def check_interactions(
    inter: Interactions, log: ProblemLog, duplicates: str = "warn"
) -> Interactions:
    """Folder-level checks of parsed interactions; returns the rows to use.

    * A (user, item) pair on more than one row is a duplicate. With ``duplicates="warn"``
      one row per pair is kept, the one in the earliest split (train, then valid, then
      test: an evaluation pair that is also a training pair could never be recommended)
      and a warning counts the dropped rows; with ``"error"`` every repeat is an error.
    * Users with valid/test rows but no train row: a warning (their rows are dropped by
      :func:`~cm3_pyg.data.hetero.build_hetero_data`, as MMRec does).
    * An empty valid or test split (after that rule): an error, as nothing could be
      evaluated.
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise ConfigError(
            f"duplicate_interactions: expected one of {list(DUPLICATE_POLICIES)}, "
            f"got {duplicates!r}"
        )
    path, n = inter.path, len(inter)
    if n == 0:
        return inter
    width = int(inter.items.max()) + 1
    key = inter.users * width + inter.items
    # Sort by pair, then split, then file position: the first row of each run is kept.
    order = np.lexsort((np.arange(n), inter.labels, key))
    run_start = np.ones(n, dtype=bool)
    run_start[1:] = key[order][1:] != key[order][:-1]
    if not run_start.all():
        first_of_run = order[np.maximum.accumulate(np.where(run_start, np.arange(n), 0))]
        repeats = np.sort(order[~run_start])  # file order
        kept_for = np.empty(n, dtype=np.int64)
        kept_for[order] = first_of_run

        def describe(k: int) -> str:
            j = int(kept_for[k])
            return (
                f"{path}: {inter.where(k)}: duplicate interaction (user {int(inter.users[k])}, "
                f"item {int(inter.items[k])}, {_SPLIT_NAMES[int(inter.labels[k])]}) of "
                f"{inter.where(j)} ({_SPLIT_NAMES[int(inter.labels[j])]}); expected each "
                f"(user, item) pair once"
            )

        if duplicates == "error":
            log.rows(
                repeats,
                lambda k: describe(k) + " (set duplicate_interactions: warn to drop repeats)",
                lambda count: f"{path}: {count} more duplicate interaction rows",
            )
        else:
            log.warning(
                f"{path}: {repeats.shape[0]} duplicate interaction rows dropped, keeping one "
                f"row per (user, item) pair in its earliest split (train, valid, test); "
                f"first: {describe(int(repeats[0]))}"
            )
        keep = np.zeros(n, dtype=bool)
        keep[order[run_start]] = True
        inter = inter.select(keep)

    labels = inter.labels
    has_train = np.zeros(int(inter.users.max()) + 1, dtype=bool)
    has_train[inter.users[labels == 0]] = True
    cold = ~has_train[inter.users]
    if cold.any():
        first = int(np.flatnonzero(cold)[0])
        num_users = np.unique(inter.users[cold]).shape[0]
        log.warning(
            f"{path}: {num_users} users have valid/test rows but no train row (first: user "
            f"{int(inter.users[first])} at {inter.where(first)}); their {int(cold.sum())} "
            f"rows are dropped, as MMRec does"
        )
    for label in (1, 2):
        split = _SPLIT_NAMES[label]
        if not np.any((labels == label) & ~cold):
            reason = (
                "every such row belongs to a user without train rows"
                if np.any(labels == label)
                else f"no row has x_label {label}"
            )
            log.error(
                f"{path}: the {split} split is empty ({reason}); expected at least one "
                f"row with x_label {label} whose user also has a train row"
            )
    return inter


# ----------------------------------------------------------------------------- features


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


#: what ``np.load(..., allow_pickle=False)`` raises on a damaged file: numpy parses the
#: header's dict with the tokenizer and ``ast`` (SyntaxError, TokenError), a header's shape
#: can ask for more memory than exists
NPY_LOAD_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, MemoryError)


def _load_one(path: Path, log: ProblemLog) -> np.ndarray | None:
    """Load one feature matrix as float32 ``[rows, dim]``, validating it fully.

    Returns ``None`` (after reporting) when the file is unusable; NaN/Inf rows are all
    reported (when collecting) and the matrix is still returned for the row-count checks.
    """
    if not path.is_file():
        log.error(f"{path}: feature file not found (expected a .npy matrix)")
        return None
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):  # .npz: reported below
        # np.load would treat such bytes as a pickle and suggest loading it unsafely.
        log.error(
            f"{path}: not a valid .npy file (it does not start with the NumPy magic bytes; "
            "expected a matrix written by numpy.save)"
        )
        return None
    try:
        # allow_pickle=False: a user's file must never run code when loaded.
        array = np.load(path, allow_pickle=False)
    except NPY_LOAD_ERRORS as exc:
        # Truncated files, damaged headers, pickled object arrays and non-.npy content.
        log.error(f"{path}: not a valid .npy file of numbers ({type(exc).__name__}: {exc})")
        return None
    if not isinstance(array, np.ndarray):
        array.close()  # an .npz archive opened lazily
        log.error(f"{path}: expected a single .npy array, found an .npz archive")
        return None
    if array.ndim != 2:
        log.error(
            f"{path}: expected a 2-D matrix [num_items, dim], found shape {tuple(array.shape)}"
        )
        return None
    if array.dtype.kind not in "iuf":
        log.error(f"{path}: expected real numbers (float or int), found dtype {array.dtype}")
        return None
    if array.shape[1] == 0:
        log.error(f"{path}: expected at least one feature column, found shape {tuple(array.shape)}")
        return None
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
        array = np.ascontiguousarray(array, dtype=np.float32)
    # Checked after the cast so values too large for float32 are caught as well.
    finite = np.isfinite(array).all(axis=1)
    log.rows(
        np.flatnonzero(~finite),
        lambda row: (
            f"{path}: row {row} (item {row}) holds NaN/Inf (or a value beyond float32 "
            f"range); expected finite numbers"
        ),
        lambda n: f"{path}: {n} more rows hold NaN/Inf",
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
    out = scan_features(Path(folder), modalities, ProblemLog(), num_items=num_items)
    assert out is not None  # a fail-fast log raises instead
    return out


def scan_features(
    folder: Path,
    modalities: Sequence[str],
    log: ProblemLog,
    num_items: int | None = None,
    inter: Interactions | None = None,
) -> dict[str, np.ndarray] | None:
    """:func:`load_features` reporting to ``log``; ``None`` if any matrix is unusable.

    ``inter``, when given, lets the row-count error point at the first interaction line
    referencing an item without a feature row.
    """
    if len(set(modalities)) != len(modalities):
        log.error(f"modalities: expected distinct names, got {list(modalities)!r}")
        return None
    out: dict[str, np.ndarray] = {}
    first: tuple[Path, int] | None = None
    usable = True
    for modality in modalities:
        path = feature_path(folder, modality)
        array = _load_one(path, log)
        if array is None:
            usable = False
            continue
        rows = int(array.shape[0])
        if first is not None and rows != first[1]:
            log.error(
                f"{path}: has {rows} rows but {first[0]} has {first[1]}; expected every "
                f"modality to have one row per item"
            )
            usable = False
        if num_items is not None and rows < num_items:
            where = ""
            beyond = np.flatnonzero(inter.items >= rows) if inter is not None else np.empty(0)
            if inter is not None and beyond.shape[0]:
                k = int(beyond[0])
                where = (
                    f" ({beyond.shape[0]} rows reference items >= {rows}, first: item "
                    f"{int(inter.items[k])} at {inter.path.name} {inter.where(k)})"
                )
            log.error(
                f"{path}: has {rows} rows but the interactions reference {num_items} items "
                f"(ids 0..{num_items - 1}); expected one row per item id{where}"
            )
            usable = False
        first = first or (path, rows)
        out[modality] = array
    return out if usable and not log.has_errors else None


# ----------------------------------------------------------------------------- folders


def read_mmrec_folder(
    folder: str | os.PathLike[str],
    name: str | None = None,
    modalities: Sequence[str] | None = None,
    duplicates: str = "warn",
    log: ProblemLog | None = None,
) -> MMRecContents | None:
    """Read and check a whole MMRec folder: ``<name>.inter`` and the feature matrices.

    The single entry point of both :class:`~cm3_pyg.data.MMRecDataset` (fail-fast log)
    and ``python -m cm3_pyg.data.validate`` (collecting log), so they apply the same
    checks.

    Args:
        folder: the dataset folder.
        name: stem of the ``.inter`` file (default: the folder's name).
        modalities: feature files to read, in fusion order (default: all, ``image`` first).
        duplicates: policy for repeated (user, item) pairs, see :func:`check_interactions`.
        log: where problems go (default: raise at the first error).

    Returns:
        :class:`MMRecContents`, or ``None`` when a collecting ``log`` recorded an error.
    """
    log = log or ProblemLog()
    folder = Path(folder)
    if not folder.is_dir():
        log.error(f"{folder}: dataset folder not found (expected a directory)")
        return None
    name = name or folder.name
    modalities = discover_modalities(folder) if modalities is None else list(modalities)
    inter = scan_interactions(folder / f"{name}.inter", log)
    num_items = None
    if inter is not None:
        inter = check_interactions(inter, log, duplicates)
        num_items = int(inter.items.max()) + 1 if len(inter) else 0
    features = scan_features(folder, modalities, log, num_items=num_items, inter=inter)
    if inter is None or features is None or log.has_errors:
        return None
    return MMRecContents(interactions=inter, features=features, modalities=list(modalities))
