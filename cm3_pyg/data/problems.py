"""Reporting input problems: fail fast (loading) or collect them all (``validate``).

The MMRec readers report every problem through a :class:`ProblemLog` and carry on where
they can. The default log raises :class:`~cm3_pyg.errors.DataFormatError` at the first
error and turns tolerated problems into :class:`~cm3_pyg.errors.DataWarning` warnings, so
loading stops at the first bad input; a collecting log (``ProblemLog(collect=True)``) records
everything, which is how ``python -m cm3_pyg.data.validate`` lists all problems of a folder
at once with exactly the checks (and messages) that loading uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cm3_pyg.errors import DataFormatError, DataWarning

__all__ = ["Problem", "ProblemLog", "Severity"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One problem found in the input.

    Attributes:
        severity: ``"error"`` (the data cannot be used) or ``"warning"`` (it can, with the
            documented fix-up such as dropping duplicate rows).
        message: the full message, starting with the file it concerns.
    """

    severity: Severity
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


class ProblemLog:
    """Sink for input problems.

    Args:
        collect: record problems instead of raising (errors) and warning (warnings).
        max_examples: in collect mode, how many offending rows of one kind are listed one
            by one before a single summary line stands for the rest (a file with a million
            bad rows should not print a million lines).
    """

    def __init__(self, collect: bool = False, max_examples: int = 10) -> None:
        self.collect = collect
        self.max_examples = max_examples
        self.problems: list[Problem] = []

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def has_errors(self) -> bool:
        return any(p.severity == "error" for p in self.problems)

    def error(self, message: str) -> None:
        """Report an error; raises :class:`DataFormatError` unless collecting."""
        if not self.collect:
            raise DataFormatError(message)
        self.problems.append(Problem("error", message))

    def warning(self, message: str) -> None:
        """Report a tolerated problem; a :class:`DataWarning` unless collecting."""
        if not self.collect:
            warnings.warn(message, DataWarning, stacklevel=3)
            return
        self.problems.append(Problem("warning", message))

    def rows(
        self,
        positions: np.ndarray,
        describe: Callable[[int], str],
        summary: Callable[[int], str],
        severity: Severity = "error",
    ) -> None:
        """Report the offending rows ``positions`` (indices into some table, in order).

        ``describe(k)`` is the message for one offending row ``k``; ``summary(n)`` the
        single line standing for the ``n`` rows beyond ``max_examples``. In fail-fast mode
        only the first row is reported (and raises).
        """
        report = self.error if severity == "error" else self.warning
        limit = self.max_examples if self.collect else 1
        for k in positions[:limit].tolist():
            report(describe(int(k)))
        if self.collect and positions.shape[0] > limit:
            report(summary(int(positions.shape[0] - limit)))
