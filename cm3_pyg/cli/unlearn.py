"""``cm3-pyg unlearn``: forget users, edges, items or one modality of items in a run.

cm3-pyg unlearn --run runs/tiktok-lightgcn-seed999 --forget-users users.txt \\
    --gold --finetune --out runs/tiktok-lightgcn-seed999-unlearn --data-root ../shared/data

Request files hold one id per line (``user<TAB>item`` per line for edges), in the dataset's
own ids (those ``cm3-pyg recommend`` prints: the id maps of the run's artifact; the 0-based
ids where the dataset has no id maps, or the run predates artifacts); blank lines and lines
starting with ``#`` are skipped. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from cm3_pyg.cli._errors import report_error
from cm3_pyg.data.idmaps import IdMap
from cm3_pyg.data.loading import DATA_ROOT_ENV
from cm3_pyg.errors import CM3Error, RequestError
from cm3_pyg.training.artifact import ARTIFACT_NAME, load_artifact
from cm3_pyg.unlearning.procedure import UnlearningSettings
from cm3_pyg.unlearning.retain import ForgetRequest
from cm3_pyg.unlearning.run import unlearn_run


def read_ids(path: str, columns: int, maps: Sequence[IdMap] | None = None) -> torch.Tensor:
    """The ids of a request file: ``[N]`` (one column) or ``[2, N]`` (two, tab-separated).

    With ``maps`` (one :class:`~cm3_pyg.data.idmaps.IdMap` per column: users, items) each
    field is an external id turned into its internal one; without, a non-negative integer.

    Raises:
        RequestError: an unreadable file, or a line (named) whose fields are not
            ``columns`` known ids.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RequestError(f"{path}: cannot read the request file ({exc})") from None
    kinds = ("user", "item") if columns == 2 else ("id",)
    expected = "user<TAB>item" if columns == 2 else "one id"
    rows: list[list[int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")] if columns == 2 else [line]
        if len(fields) != columns:
            raise RequestError(f"{path}, line {number}: expected {expected}, got {line!r}")
        values = []
        for field_value, kind, index in zip(fields, kinds, range(columns), strict=True):
            if maps is not None:
                if field_value not in maps[index]:
                    raise RequestError(
                        f"{path}, line {number}: unknown {kind} {field_value!r} (not an id of "
                        "the run's data)"
                    )
                values.append(maps[index].to_internal(field_value))
                continue
            try:
                value = int(field_value)
            except ValueError:
                value = -1
            if value < 0:
                raise RequestError(
                    f"{path}, line {number}: expected {expected} (non-negative integers), "
                    f"got {line!r}"
                )
            values.append(value)
        rows.append(values)
    ids = torch.tensor(rows, dtype=torch.long).reshape(-1, columns)
    return ids.t().contiguous() if columns == 2 else ids.flatten()


def _id_maps(run: str) -> tuple[IdMap, IdMap] | None:
    """The run's (user, item) id maps from its artifact; ``None`` if it has none."""
    if not (Path(run) / ARTIFACT_NAME).is_file():
        return None
    artifact = load_artifact(run)
    return IdMap(artifact.user_ids), IdMap(artifact.item_ids)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="folder of the trained run")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--forget-users", metavar="FILE")
    what.add_argument("--forget-edges", metavar="FILE")
    what.add_argument("--forget-items", metavar="FILE")
    what.add_argument("--forget-modality", metavar="NAME", help="with --items FILE")
    parser.add_argument("--items", metavar="FILE", help="items whose --forget-modality rows go")
    parser.add_argument("--gold", action="store_true", help="also retrain from scratch")
    parser.add_argument("--finetune", action="store_true", help="also the retain-only baseline")
    parser.add_argument("--alpha", type=float, default=UnlearningSettings.alpha)
    parser.add_argument("--max-epochs", type=int, default=UnlearningSettings.max_epochs)
    parser.add_argument(
        "--check-every",
        type=int,
        default=UnlearningSettings.check_every,
        help="optimiser steps between checks of the stopping rule (default: every step)",
    )
    parser.add_argument(
        "--min-epochs",
        type=float,
        default=UnlearningSettings.min_epochs,
        help="passes before the rule may stop (a modality request runs max(1, this))",
    )
    parser.add_argument("--out", required=True, help="new folder for the unlearned run")
    parser.add_argument("--data-root", help=f"MMRec datasets folder (default ${DATA_ROOT_ENV})")
    parser.add_argument("--cache-dir", help="processed-data cache for read-only data")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        maps = _id_maps(args.run)
        users, items = (None, None) if maps is None else ([maps[0]], [maps[1]])
        if args.forget_modality is not None:
            if args.items is None:
                raise RequestError("--forget-modality needs --items FILE")
            ids = read_ids(args.items, 1, items)
            request = ForgetRequest("modality", ids, args.forget_modality)
        elif args.items is not None:
            raise RequestError("--items goes with --forget-modality only")
        elif args.forget_edges is not None:
            request = ForgetRequest("edges", read_ids(args.forget_edges, 2, maps))
        elif args.forget_users is not None:
            request = ForgetRequest("users", read_ids(args.forget_users, 1, users))
        else:
            request = ForgetRequest("items", read_ids(args.forget_items, 1, items))
        settings = UnlearningSettings(
            alpha=args.alpha,
            max_epochs=args.max_epochs,
            check_every=args.check_every,
            min_epochs=args.min_epochs,
        )
        report = unlearn_run(
            args.run,
            request,
            args.out,
            settings,
            gold=args.gold,
            finetune=args.finetune,
            data_root=args.data_root,
            cache_dir=args.cache_dir,
        )
    except (CM3Error, ValueError, OSError, KeyboardInterrupt) as exc:
        return report_error(exc, "; nothing was written")
    log = logging.getLogger("cm3_pyg")
    for key in ("original", "unlearned", "finetune", "gold"):
        record = report[key]
        if record is not None:
            log.info(
                "%-9s forget R@20 %.4f  test R@20 %.4f  %.1f s",
                key,
                record["forget"].get("recall@20", float("nan")),
                record["test"]["recall@20"],
                record["seconds"],
            )
    log.info("wrote %s", Path(args.out) / "unlearn.json")
    return 0
