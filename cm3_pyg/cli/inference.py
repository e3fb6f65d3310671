"""``cm3-pyg recommend | export | serve | evaluate``: use a finished run's artifact.

cm3-pyg recommend runs/synthetic-cm3-seed999 --users 0,17 --k 10
cm3-pyg export runs/synthetic-cm3-seed999 --out exports/cm3
cm3-pyg serve runs/synthetic-cm3-seed999 --port 8000    # GET /recommend?user=0&k=10
cm3-pyg evaluate runs/synthetic-cm3-seed999 --split test

Each reads the run's ``artifact.pt`` (the best validation epoch); ``evaluate`` also reads
the run's dataset again. Exit codes: 0 done, 2 bad input (unknown user, bad k, a missing
or corrupt artifact), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cm3_pyg.cli._errors import report_error
from cm3_pyg.data.loading import DATA_ROOT_ENV, load_dataset
from cm3_pyg.errors import CheckpointError, CM3Error, RequestError
from cm3_pyg.io import atomic_write_text
from cm3_pyg.metrics import FullRankingEvaluator
from cm3_pyg.serving import Artifact, TopK, export_embeddings, load_artifact, make_server
from cm3_pyg.training.inputs import Splits, get_splits

__all__ = ["analyze_main", "evaluate_main", "export_main", "recommend_main", "serve_main"]


def _run(body: Callable[[], int]) -> int:
    try:
        return body()
    except (CM3Error, OSError, KeyboardInterrupt) as exc:
        return report_error(exc)


def _run_splits(
    artifact: Artifact, run: str, data_root: str | None, cache_dir: str | None
) -> Splits:
    """The splits of the data ``run`` trained on, read again and checked against the
    artifact's train interactions (retain data for an unlearned run)."""
    config = artifact.config
    synthetic = artifact.dataset == "synthetic"
    data, _ = load_dataset(
        None if synthetic else data_root,
        None if synthetic else artifact.dataset,
        cache_dir=cache_dir,
        modalities=config.get("modalities"),
        duplicates=config.get("duplicate_interactions", "warn"),
    )
    retain = Path(run) / "retain.pt"
    if retain.exists():
        from cm3_pyg.unlearning.retain import apply_retain, load_retain

        data = apply_retain(data, load_retain(retain))
    splits = get_splits(data)
    train = splits.train
    order = torch.argsort(train[0] * artifact.num_items + train[1])
    same = train.size(1) == artifact.exclude_items.numel() and torch.equal(
        train[1, order], artifact.exclude_items
    )
    if not same:
        raise CheckpointError(
            f"{run}: the data read for {artifact.dataset!r} is not the data the run "
            "trained on (its train interactions differ)"
        )
    return splits


def _parser(prog: str | None, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("run", help="a run's output folder (holding artifact.pt)")
    return parser


def _user_list(args: argparse.Namespace) -> list[str]:
    if args.users is not None:
        users = [u.strip() for u in args.users.split(",") if u.strip()]
    else:
        path = Path(args.users_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RequestError(f"{path}: cannot read the users file ({exc})") from None
        users = [line.strip() for line in text.splitlines() if line.strip()]
    if not users:
        raise RequestError("no user given (--users ID,ID or --users-file FILE)")
    return users


def recommend_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog, "Print top-k items per user as JSON lines, in the dataset's ids.")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", help="comma-separated user ids")
    who.add_argument("--users-file", help="a file of user ids, one per line")
    parser.add_argument("--k", type=int, default=20, help="list length (default 20)")
    parser.add_argument(
        "--include-train", action="store_true", help="do not exclude the users' train items"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        top_k = TopK(args.run)
        users = _user_list(args)
        for start in range(0, len(users), 1024):  # bounded memory for long user files
            chunk = users[start : start + 1024]
            for record in top_k.recommend(chunk, args.k, exclude_train=not args.include_train):
                print(json.dumps(record))
        return 0

    return _run(body)


def export_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog, "Write user and item embeddings (.npy) with their id order.")
    parser.add_argument("--out", required=True, help="a new folder for the export")
    args = parser.parse_args(argv)

    def body() -> int:
        summary = export_embeddings(load_artifact(args.run), args.out)
        print(json.dumps({"out": str(args.out), **summary}))
        return 0

    return _run(body)


def serve_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog, "Answer GET /recommend?user=ID&k=K over HTTP (JSON).")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default local)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--max-k", type=int, default=100, help="largest k served (default 100)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def body() -> int:
        if not 0 <= args.port <= 65535:
            raise RequestError(f"--port must be in [0, 65535], got {args.port}")
        if args.max_k < 1:
            raise RequestError(f"--max-k must be >= 1, got {args.max_k}")
        top_k = TopK(args.run, max_k=args.max_k)
        try:
            server = make_server(top_k, args.host, args.port)
        except OSError as exc:
            raise RequestError(
                f"cannot listen on {args.host}:{args.port} ({exc.strerror})"
            ) from None
        print(f"serving {top_k.artifact.model} on {server.url}", flush=True)
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return 0

    return _run(body)


def evaluate_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog, "Full-ranking metrics of a run's best epoch on its data's split.")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument("--topk", default=None, help="cut-offs, e.g. 10,20 (default: the run's)")
    parser.add_argument(
        "--data-root", default=None, help=f"folder of MMRec datasets (default ${DATA_ROOT_ENV})"
    )
    parser.add_argument("--cache-dir", default=None, help="processed-data cache folder")
    args = parser.parse_args(argv)

    def body() -> int:
        artifact = load_artifact(args.run)
        config = artifact.config
        splits = _run_splits(artifact, args.run, args.data_root, args.cache_dir)
        train = splits.train
        try:
            ks = (
                [int(k) for k in args.topk.split(",") if k.strip()]
                if args.topk
                else list(config["topk"])
            )
        except ValueError:
            raise RequestError(
                f"--topk: expected comma-separated integers, got {args.topk!r}"
            ) from None
        evaluator = FullRankingEvaluator(
            artifact.num_items, train, getattr(splits, args.split), tuple(ks)
        )
        metrics = evaluator.evaluate(artifact.user_embeddings, artifact.item_embeddings)
        print(json.dumps({"split": args.split, "epoch": artifact.epoch, **metrics}))
        return 0

    return _run(body)


def analyze_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Alignment (test pairs) and uniformity (users, items) of runs' embeddings: "
            "analysis.json, and analysis.png (the alignment-uniformity plane) with matplotlib."
        ),
    )
    parser.add_argument("runs", nargs="+", help="run folders (holding artifact.pt)")
    parser.add_argument("--out", required=True, help="folder for analysis.json / .png")
    parser.add_argument("--split", choices=("valid", "test"), default="test")
    parser.add_argument("--max-rows", type=int, default=10_000, help="uniformity sample size")
    parser.add_argument(
        "--data-root", default=None, help=f"folder of MMRec datasets (default ${DATA_ROOT_ENV})"
    )
    parser.add_argument("--cache-dir", default=None, help="processed-data cache folder")
    args = parser.parse_args(argv)

    def body() -> int:
        from cm3_pyg.experiments.analysis import embedding_geometry, plot_geometry

        if args.max_rows < 2:
            raise RequestError(f"--max-rows must be >= 2, got {args.max_rows}")
        report = {}
        for run in args.runs:
            artifact = load_artifact(run)
            splits = _run_splits(artifact, run, args.data_root, args.cache_dir)
            geometry = embedding_geometry(
                artifact.user_embeddings,
                artifact.item_embeddings,
                getattr(splits, args.split),
                max_rows=args.max_rows,
            )
            report[str(run)] = {"model": artifact.model, "dataset": artifact.dataset, **geometry}
            print(json.dumps({"run": str(run), **report[str(run)]}))
        out = Path(args.out)
        atomic_write_text(out / "analysis.json", json.dumps(report, indent=2) + "\n")
        if plot_geometry(report, out / "analysis.png") is None:
            print("matplotlib is not installed: no analysis.png (pip install 'cm3_pyg[plot]')")
        return 0

    return _run(body)
