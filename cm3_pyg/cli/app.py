"""``cm3-pyg``: the command-line entry point, one subcommand per job.

cm3-pyg train --model cm3 --data-root ../shared/data --dataset tiktok
cm3-pyg recommend RUN --users 0,17 --k 10
cm3-pyg COMMAND --help

Each subcommand is a ``main(argv, prog)`` of its own module, also usable from Python.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from cm3_pyg.cli._errors import EXIT_BAD_INPUT

__all__ = ["COMMANDS", "main"]

#: subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("cm3_pyg.cli.train", "main", "train a model; write metrics, checkpoint, artifact"),
    "evaluate": ("cm3_pyg.cli.inference", "evaluate_main", "metrics of a run on its data"),
    "recommend": ("cm3_pyg.cli.inference", "recommend_main", "top-k per user, JSON lines"),
    "export": ("cm3_pyg.cli.inference", "export_main", "user/item embeddings as .npy + ids"),
    "serve": ("cm3_pyg.cli.inference", "serve_main", "HTTP server: GET /recommend?user=ID&k=K"),
    "prepare": ("cm3_pyg.cli.prepare", "main", "your interactions + item texts -> a dataset"),
    "validate": ("cm3_pyg.data.validate", "main", "check a dataset folder, every problem"),
    "compare": ("cm3_pyg.cli.compare", "main", "model grids, validation-selected tables"),
    "unlearn": ("cm3_pyg.cli.unlearn", "main", "forget users, edges, items or a modality"),
    "analyze": ("cm3_pyg.cli.inference", "analyze_main", "alignment/uniformity of runs, plot"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: cm3-pyg COMMAND [options]   (cm3-pyg COMMAND --help for each)", ""]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_BAD_INPUT
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    module, function, _ = COMMANDS[name]
    command = getattr(importlib.import_module(module), function)
    return int(command(rest, prog=f"cm3-pyg {name}"))


if __name__ == "__main__":
    sys.exit(main())
