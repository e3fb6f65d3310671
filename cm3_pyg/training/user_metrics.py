"""Every test user's metrics of a run (``test_users.csv``): what paired significance tests
between runs compare.

One row per evaluated test user (users with at least one test item), sorted by internal id::

    user,user_id,recall@5,...,f1@50
    0,u123,0.5,...

``user`` is the internal id, ``user_id`` the dataset's external id; the metric columns are
those of :func:`cm3_pyg.metrics.ranking_metrics` at the run's ``topk``, at the best
validation epoch, and their column means are the run's ``metrics.json`` test values.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from cm3_pyg.errors import DataFormatError
from cm3_pyg.io import atomic_write_text
from cm3_pyg.metrics import PerUserMetrics

__all__ = ["TEST_USERS_NAME", "read_user_metrics", "write_user_metrics"]

TEST_USERS_NAME = "test_users.csv"


def write_user_metrics(
    path: str | os.PathLike[str], metrics: PerUserMetrics, user_ids: Sequence[str]
) -> None:
    """Write ``metrics`` atomically; ``user_ids[u]`` is internal user ``u``'s external id."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = list(metrics.values)
    writer.writerow(["user", "user_id", *names])
    columns = [metrics.values[name].tolist() for name in names]
    for row, user in enumerate(metrics.users.tolist()):
        # 12 significant digits: means agree with metrics.json to ~1e-12
        writer.writerow([user, user_ids[user], *(f"{col[row]:.12g}" for col in columns)])
    atomic_write_text(path, buffer.getvalue())


def read_user_metrics(path: str | os.PathLike[str]) -> PerUserMetrics:
    """Read a ``test_users.csv``.

    Raises:
        DataFormatError: a missing or unreadable file, a bad header, or a row whose user id
            or metric value is not a number (naming the file, row and column).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot read per-user metrics ({exc})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0][:2] != ["user", "user_id"] or len(rows[0]) < 3:
        raise DataFormatError(f"{path}: expected a header 'user,user_id,<metric>,...'")
    names = rows[0][2:]
    users: list[int] = []
    columns: list[list[float]] = [[] for _ in names]
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(rows[0]):
            raise DataFormatError(
                f"{path}: row {number} has {len(row)} fields, the header {len(rows[0])}"
            )
        try:
            users.append(int(row[0]))
        except ValueError:
            raise DataFormatError(
                f"{path}: row {number}, user: not an integer ({row[0]!r})"
            ) from None
        for column, (name, raw) in enumerate(zip(names, row[2:], strict=True)):
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataFormatError(f"{path}: row {number}, {name}: not a number ({raw!r})")
            columns[column].append(value)
    if len(set(users)) != len(users):
        raise DataFormatError(f"{path}: a user appears twice")
    values = {
        name: torch.tensor(column, dtype=torch.float64)
        for name, column in zip(names, columns, strict=True)
    }
    return PerUserMetrics(torch.tensor(users, dtype=torch.long), values)
