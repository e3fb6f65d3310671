"""``cm3-pyg compare``: model grids, selected on validation Recall@20, test mean ± std.

cm3-pyg compare --models bprmf,lightgcn --seeds 999,1000 --budget 2 --epochs 5
cm3-pyg compare --data-root ../shared/data --dataset tiktok \
    --models cm3,lirdrec,sea --seeds 999,1000,1001 --budget 4 --out runs/compare-tiktok

(``examples/compare_models.py`` is the same command.)

Writes results.md, results.csv, grid.csv, runs/<model>/<point>/seed<s>/metrics.json and,
when matplotlib is installed (pip install 'cm3_pyg[plot]'), results.png. Finished runs whose
configuration is unchanged are reused (--rerun retrains them). --shard K/N trains only every
N-th run of the plan, from the K-th, and writes no results, so N processes or machines share
one grid; a last call without it reuses their runs and writes the results. A selected run
that kept only its metrics.json is retrained for its per-user metrics and artifact. The
logic lives in cm3_pyg.experiments.compare.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from cm3_pyg.cli._errors import report_error
from cm3_pyg.data.loading import DATA_ROOT_ENV, load_dataset
from cm3_pyg.errors import CM3Error
from cm3_pyg.experiments import (
    GRID_MODES,
    complete_selected_runs,
    plot_results,
    run_comparison,
    select_best,
    significance,
    summarize,
    write_results,
)
from cm3_pyg.models import MODELS
from cm3_pyg.training import parse_overrides, training_defaults
from cm3_pyg.training.memory import retain_freed_memory

T = TypeVar("T")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise ValueError("expected N or MODEL=N") from None
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def _shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    try:
        shard = (int(k), int(n))
    except ValueError:
        shard = (0, 0)
    if not sep or not 1 <= shard[0] <= shard[1]:
        raise argparse.ArgumentTypeError(f"--shard: expected K/N with 1 <= K <= N, got {text!r}")
    return shard


def _grid_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in GRID_MODES:
        raise ValueError(f"expected MODE or MODEL=MODE with MODE one of {GRID_MODES}")
    return mode


def _per_model(
    flag: str, convert: Callable[[str], T]
) -> Callable[[str], tuple[T | None, dict[str, T]]]:
    """A parser of ``"V"``, ``"V,bm3=W,cm3=X"`` or ``"bm3=W"`` for ``flag``: the default and
    per-model values, each passed through ``convert`` (which raises ``ValueError``)."""

    def parse(text: str) -> tuple[T | None, dict[str, T]]:
        default: T | None = None
        per_model: dict[str, T] = {}
        for token in (t.strip() for t in text.split(",")):
            if not token:
                continue
            name, sep, value = token.partition("=")
            try:
                converted = convert(value if sep else name)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"{flag}: {exc}, got {token!r}") from None
            if sep:
                per_model[name.strip().lower()] = converted
            else:
                default = converted
        return default, per_model

    return parse


def parse_grid_values(pairs: Sequence[str]) -> dict[str, dict[str, list[object]]]:
    """``["bm3.n_layers=[2, 3, 4]", "bm3.dropout=0.3"]`` -> ``{"bm3": {"n_layers": [2, 3, 4],
    "dropout": [0.3]}}``: values are YAML, a single value is a one-value list."""
    form = "MODEL.KEY=[v1, v2, ...]"
    out: dict[str, dict[str, list[object]]] = {}
    for pair in pairs:
        [(target, values)] = parse_overrides([pair], flag="--grid-values", form=form).items()
        model, dot, key = target.partition(".")
        if not dot or not model or not key.strip():
            raise ValueError(f"--grid-values {pair!r}: expected {form}")
        values = values if isinstance(values, list) else [values]
        if not values or any(v is None for v in values):
            raise ValueError(f"--grid-values {pair!r}: expected at least one non-empty value")
        out.setdefault(model.lower(), {})[key.strip()] = values
    return out


def _describe_grid_values(values: Mapping[str, Mapping[str, Sequence[object]]]) -> str:
    return "; ".join(
        f"{model}: " + ", ".join(f"{key}={list(v)}" for key, v in keys.items())
        for model, keys in sorted(values.items())
    )


_budget = _per_model("budget", _positive_int)
_epochs = _per_model("epochs", _positive_int)
_grid = _per_model("grid", _grid_mode)


def _describe_per_model(
    default: object | None, per_model: Mapping[str, object], fallback: str
) -> str:
    text = fallback if default is None else str(default)
    extra = ", ".join(f"{m}: {n}" for m, n in sorted(per_model.items()))
    return f"{text} ({extra})" if extra else text


def _describe_budget(default: int | None, per_model: dict[str, int]) -> str:
    return _describe_per_model(default, per_model, "all points")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-root", default=None, help=f"MMRec datasets folder (default ${DATA_ROOT_ENV})"
    )
    parser.add_argument("--dataset", default=None, help="dataset folder name; none: synthetic data")
    parser.add_argument(
        "--inter", default=None, metavar="STEM", help="use <STEM>.inter instead of <dataset>.inter"
    )
    parser.add_argument("--cache-dir", default=None, help="processed-data cache for read-only data")
    parser.add_argument("--models", default="cm3,lirdrec,sea", help="comma-separated model names")
    parser.add_argument(
        "--seeds", type=_int_list, default=[999, 1000, 1001], help="e.g. 999,1000,1001"
    )
    parser.add_argument(
        "--budget",
        type=_budget,
        default=(None, {}),
        help="at most N grid points per model; per-model values after it, e.g. 1,bm3=4",
    )
    parser.add_argument(
        "--grid",
        type=_grid,
        default=("small", {}),
        help="small: one key at a time; full: product; coordinate: small, then each key's "
        "best value combined; per-model values after it, e.g. coordinate,bm3=full",
    )
    parser.add_argument(
        "--grid-values",
        action="append",
        default=[],
        metavar="MODEL.KEY=[V1,V2]",
        help="replace (or add) one key's values in one model's YAML grid, e.g. "
        "'bm3.n_layers=[2,3,4]' (repeatable; a --set of that key moves the default point)",
    )
    parser.add_argument(
        "--epochs",
        type=_epochs,
        default=(None, {}),
        help="maximum epochs of every run (default: the configs' own, with early stopping); "
        "per-model values after it, e.g. 300,sea=120 or only sea=120",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (repeatable)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default runs/compare-<dataset>)"
    )
    parser.add_argument(
        "--synthetic-size",
        default="3000,2000",
        metavar="USERS,ITEMS",
        help="synthetic data size without --dataset",
    )
    parser.add_argument("--rerun", action="store_true", help="retrain runs that already finished")
    parser.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="K/N",
        help="train only runs K, K+N, K+2N, ... of the plan and write no results (N processes "
        "share one --out; a last call without --shard writes the results)",
    )
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep every run's checkpoint.pt"
    )
    parser.add_argument("--progress", action="store_true", help="per-epoch progress bars")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        print(
            "error: compare runs its grid in one process (every process would write the same "
            "results); start single runs on several processes with torchrun ... train",
            file=sys.stderr,
        )
        return 2
    retain_freed_memory()  # an application-level allocator choice; see cm3_pyg.training.memory
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        print(f"error: unknown model(s) {unknown}; available: {sorted(MODELS)}", file=sys.stderr)
        return 2
    try:
        overrides = parse_overrides(args.overrides)
        grid_values = parse_grid_values(args.grid_values)
        users, items = _int_list(args.synthetic_size)
        duplicates = overrides.get(
            "duplicate_interactions", training_defaults()["duplicate_interactions"]
        )
        data, name = load_dataset(
            args.data_root,
            args.dataset,
            cache_dir=args.cache_dir,
            modalities=overrides.get("modalities"),
            duplicates=duplicates,
            synthetic_size=(users, items),
            inter=args.inter,
        )
        out = Path(args.out or os.path.join("runs", f"compare-{name}"))
        records = run_comparison(
            data,
            models,
            args.seeds,
            out,
            dataset_name=name,
            grid_mode=args.grid[0] or "small",
            model_grid_modes=args.grid[1],
            model_grid_values=grid_values,
            budget=args.budget[0],
            model_budgets=args.budget[1],
            epochs=args.epochs[0],
            model_epochs=args.epochs[1],
            overrides=overrides,
            reuse=not args.rerun,
            keep_checkpoints=args.keep_checkpoints,
            progress=args.progress,
            shard=args.shard,
        )
        if args.shard is not None:
            done = sum(r.stop_reason in ("completed", "early_stopping") for r in records)
            logging.info(
                "shard %d/%d: %d of its %d runs finished; run without --shard to write the results",
                *args.shard,
                done,
                len(records),
            )
            return 0
        summaries = summarize(records)
        selected = select_best(summaries)
        records, retrained = complete_selected_runs(
            data, selected, records, dataset_name=name, progress=args.progress
        )
    except (CM3Error, ValueError, OSError, KeyboardInterrupt) as exc:
        return report_error(exc, "; finished runs are kept and reused next time")
    # the same points, now with the retrained runs' values
    summaries = summarize(records)
    chosen = {(s.model, s.slug) for s in selected.values()}
    selected = {s.model: s for s in summaries if (s.model, s.slug) in chosen}
    meta = {
        "dataset": name,
        "models": ", ".join(models),
        "seeds": ", ".join(map(str, args.seeds)),
        "grid": _describe_per_model(args.grid[0], args.grid[1], "small"),
        "budget": _describe_budget(*args.budget),
        **({"grid values": _describe_grid_values(grid_values)} if grid_values else {}),
        **({"overrides": ", ".join(args.overrides)} if args.overrides else {}),
        "epochs": _describe_per_model(*args.epochs, "config default (early stopping)"),
    }
    try:
        tests = significance(selected, records)
        tests.notes.extend(retrained)
        paths = write_results(out, summaries, selected, meta, significance=tests)
    except (CM3Error, OSError) as exc:
        return report_error(exc, "; finished runs are kept and reused next time")
    if plot_results(out / "results.png", selected):
        paths.append(out / "results.png")
    for model, s in selected.items():
        logging.info(
            "%s: valid R@20 %.4f, test R@20 %.4f ± %.4f at %s",
            model,
            s.valid_mean,
            s.test_mean["recall@20"],
            s.test_std["recall@20"],
            s.point,
        )
    logging.info("wrote %s", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
