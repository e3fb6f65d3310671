"""Check an MMRec dataset folder and list every problem at once.

    python -m cm3_pyg.data.validate DIR [--name NAME] [--modalities a,b] [--duplicates error]

One line per problem on stdout (``error: ...`` or ``warning: ...``), a summary on stderr.
Exit code 0 when there is no error (warnings are tolerated problems, e.g. dropped duplicate
rows; add ``--strict`` to fail on them too), 1 when there are errors, 2 for bad arguments.

The checks are exactly those :class:`~cm3_pyg.data.MMRecDataset` applies when loading
(both run :func:`~cm3_pyg.data.mmrec.read_mmrec_folder`); loading stops at the first
error, this command collects them all.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cm3_pyg.data.mmrec import DUPLICATE_POLICIES, read_mmrec_folder
from cm3_pyg.data.problems import Problem, ProblemLog

__all__ = ["main", "validate_folder"]


def validate_folder(
    folder: str | os.PathLike[str],
    name: str | None = None,
    modalities: Sequence[str] | None = None,
    duplicates: str = "warn",
    max_examples: int = 10,
) -> list[Problem]:
    """Every problem of an MMRec folder, in the order found (files, then lines/rows).

    Args:
        folder: the dataset folder.
        name: stem of the ``.inter`` file (default: the folder's name).
        modalities: feature files to check (default: every ``<m>_feat.npy``).
        duplicates: ``"warn"`` or ``"error"`` for repeated (user, item) pairs.
        max_examples: offending rows of one kind listed individually before a summary line.

    Returns:
        the problems; empty when the folder loads cleanly.
    """
    log = ProblemLog(collect=True, max_examples=max_examples)
    folder = Path(folder)
    contents = read_mmrec_folder(folder, name, modalities, duplicates=duplicates, log=log)
    if contents is not None and not contents.modalities:
        log.warning(
            f"{folder}: no <modality>_feat.npy files; only models without item features "
            f"can train on this folder"
        )
    return log.problems


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m cm3_pyg.data.validate",
        description=(
            "Check an MMRec dataset folder (<name>.inter and <modality>_feat.npy files) and "
            "print every problem, one per line. Exit code 0: no errors; 1: problems found."
        ),
    )
    parser.add_argument("folder", help="the dataset folder")
    parser.add_argument("--name", default=None, help="stem of the .inter file (default: folder)")
    parser.add_argument(
        "--modalities",
        default=None,
        help="comma-separated modalities to check, e.g. image,text (default: all *_feat.npy)",
    )
    parser.add_argument(
        "--duplicates",
        choices=DUPLICATE_POLICIES,
        default="warn",
        help="repeated (user, item) rows: a warning (they are dropped on load) or an error",
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        default=10,
        help="offending rows of one kind listed before a summary line (default 10)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings as well")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    modalities = None
    if args.modalities is not None:
        modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    problems = validate_folder(
        args.folder,
        name=args.name,
        modalities=modalities,
        duplicates=args.duplicates,
        max_examples=max(1, args.max_examples),
    )
    for problem in problems:
        print(problem)
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    # The summary goes to stderr so stdout holds exactly one line per problem.
    print(f"{args.folder}: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
    return 1 if errors or (args.strict and warnings) else 0


if __name__ == "__main__":
    sys.exit(main())
