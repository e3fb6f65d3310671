"""Command-line entry points: ``cm3-pyg`` (:mod:`cm3_pyg.cli.app`) and its subcommands.

``from cm3_pyg.cli import main`` is the training command (``cm3-pyg train``), as before.
"""

from cm3_pyg.cli._errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_NON_FINITE_LOSS
from cm3_pyg.cli.train import DATA_ROOT_ENV, build_parser, main

__all__ = [
    "DATA_ROOT_ENV",
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_NON_FINITE_LOSS",
    "build_parser",
    "main",
]
