"""``cm3-pyg train`` (also ``python -m cm3_pyg.cli`` and ``examples/train_cm3.py``).

Exit codes: 0 success, 2 bad input (data, config, checkpoint, an output path that cannot
be written), 3 training stopped on a NaN/Inf loss (``metrics.json`` then holds the best
epoch before it), 130 interrupted (Ctrl-C; the last completed epoch's checkpoint stays).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cm3_pyg.cli._errors import EXIT_NON_FINITE_LOSS, report_error
from cm3_pyg.data.loading import DATA_ROOT_ENV, load_dataset
from cm3_pyg.errors import CM3Error, NonFiniteLossError
from cm3_pyg.models import available_models, get_model_class
from cm3_pyg.training import load_config, parse_overrides, run_experiment
from cm3_pyg.training.memory import retain_freed_memory

__all__ = ["DATA_ROOT_ENV", "build_parser", "main"]


def build_parser(default_model: str = "cm3", prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a multimodal recommender and write metrics.json, epochs.csv, checkpoint.pt "
            "and artifact.pt. With no data arguments it trains on the embedded synthetic "
            "dataset."
        ),
    )
    parser.add_argument(
        "--model", default=default_model, choices=available_models(), help="model name"
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help=f"folder holding MMRec datasets (default: ${DATA_ROOT_ENV} when --dataset is given)",
    )
    parser.add_argument(
        "--dataset", default=None, help="dataset folder name under the data root, e.g. tiktok"
    )
    parser.add_argument(
        "--inter",
        default=None,
        metavar="STEM",
        help="use <STEM>.inter of the dataset folder instead of <dataset>.inter",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where processed data is cached if the data folder is read-only",
    )
    parser.add_argument(
        "--force-reload",
        action="store_true",
        help="rebuild the dataset's processed cache (it is rebuilt anyway when an input "
        "file's content changes)",
    )
    parser.add_argument("--config", default=None, help="YAML file of config overrides")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set n_ui_layers=4",
    )
    parser.add_argument("--epochs", type=int, default=None, help="maximum number of epochs")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument(
        "--cold-items",
        type=float,
        default=None,
        metavar="FRACTION",
        help="hold out this fraction of the items whole to evaluate cold start (= --set "
        "cold_items=FRACTION; models with item features only)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: runs/<dataset>-<model>-seed<seed>)"
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help=(
            "continue the run whose output folder is DIR from its checkpoint.pt (written after "
            "every epoch); give the same data and settings as the original run (only --epochs "
            "may change); outputs keep going to DIR"
        ),
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out (otherwise a folder holding a run is refused)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")
    return parser


def main(
    argv: Sequence[str] | None = None, default_model: str = "cm3", prog: str | None = None
) -> int:
    args = build_parser(default_model, prog).parse_args(argv)
    retain_freed_memory()  # an application-level allocator choice; see cm3_pyg.training.memory
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("cm3_pyg")
    out: str | None = None
    try:
        model_cls = get_model_class(args.model)
        overrides = parse_overrides(args.overrides)
        if args.epochs is not None:
            overrides["epochs"] = args.epochs
        if args.seed is not None:
            overrides["seed"] = args.seed
        if args.cold_items is not None:
            overrides["cold_items"] = args.cold_items
        config = load_config(model_cls.default_config(), args.config, overrides)
        model_cls.check_config(config)  # before the data is read
        data, name = load_dataset(
            args.data_root,
            args.dataset,
            cache_dir=args.cache_dir,
            modalities=config.get("modalities"),
            duplicates=config["duplicate_interactions"],
            inter=args.inter,
            force_reload=args.force_reload,
        )
        if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise CM3Error(f"--resume {args.resume} writes into its own folder; drop --out")
        out = (
            args.resume
            or args.out
            or os.path.join("runs", f"{name}-{model_cls.name}-seed{config['seed']}")
        )
        if Path(out).exists() and not Path(out).is_dir():
            raise CM3Error(f"--out {out}: exists and is not a folder")
        Path(out).mkdir(parents=True, exist_ok=True)  # fail before training, not after
        metrics = run_experiment(
            data,
            args.model,
            config,
            out_dir=out,
            dataset_name=name,
            progress=not args.no_progress,
            resume=args.resume is not None,
            overwrite=args.overwrite,
        )
    except NonFiniteLossError as exc:
        # Checked before CM3Error (its base class): a failed run, not bad input.
        print(
            f"error: {exc}; metrics.json in {out} holds the best epoch before it", file=sys.stderr
        )
        return EXIT_NON_FINITE_LOSS
    except (CM3Error, OSError, KeyboardInterrupt) as exc:
        where = f"; {out} keeps the checkpoint of the last completed epoch" if out else ""
        return report_error(exc, where)
    test, pop = metrics["test"], metrics["popularity"]["test"]
    log.info("best epoch %d of %d", metrics["best_epoch"], metrics["epochs_run"])
    for key in dict.fromkeys((str(config["valid_metric"]).lower(), "recall@20", "ndcg@20")):
        if key in test and key in pop:
            name = model_cls.name
            log.info("test %-9s %s %.4f | popularity %.4f", key, name, test[key], pop[key])
    if "cold" in metrics:
        cold = metrics["cold"]
        log.info(
            "cold items (%d): recall@20 %s %.4f | features-only kNN %.4f | random %.4f",
            cold["items"],
            model_cls.name,
            cold["model"].get("recall@20", float("nan")),
            cold.get("feature_knn", {}).get("recall@20", float("nan")),
            cold["random"].get("recall@20", float("nan")),
        )
    log.info("wrote %s", os.path.join(out, "metrics.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
