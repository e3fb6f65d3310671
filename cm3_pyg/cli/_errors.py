"""The exit codes of every ``cm3-pyg`` subcommand and the one ``error:`` line per failure."""

from __future__ import annotations

import sys

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_NON_FINITE_LOSS", "report_error"]

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE_LOSS = 3
EXIT_INTERRUPTED = 130


def report_error(exc: BaseException, interrupted: str = "") -> int:
    """Print one ``error: ...`` line for ``exc`` (bad input, an OS error, Ctrl-C) on stderr and
    return the exit code; ``interrupted`` is appended to the Ctrl-C line (what was kept). A
    message of several lines (YAML's parser writes them) is joined into one."""
    if isinstance(exc, KeyboardInterrupt):
        print(f"error: interrupted{interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError):  # permissions, a full disk, a file where a folder should be
        target = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {_one_line(f'{target}{exc.strerror or exc}')}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"error: {_one_line(str(exc))}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())
