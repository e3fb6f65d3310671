"""Issue 17's bring-your-own-data measurement: MovieLens-100K through ``cm3-pyg prepare``.

python -m benchmarks.byod_ml100k --data-root ../shared/data --out runs/byod-ml100k

Prepares ``ml-100k.inter`` (RecBole columns, string ids) with the titles and genres of
``ml-100k.item`` as text through the packaged all-MiniLM-L6-v2 (MMRec's random per-user
8:1:1 split, seed 999), then trains CM3 on that text modality and LightGCN on the same split
(defaults, seeds 999, 1000, 1001) and writes ``results.json`` and ``results.md``: test
Recall/NDCG@20 mean ± std, validation-selected epochs. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cm3_pyg.data.loading import load_dataset
from cm3_pyg.data.prepare import PrepareOptions, prepare_dataset
from cm3_pyg.io import atomic_write_text
from cm3_pyg.models import get_model_class
from cm3_pyg.training import load_config
from cm3_pyg.training.experiment import run_experiment

NAME = "ml100k-text"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="folder holding ml-100k/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="cm3,lightgcn")
    parser.add_argument("--seeds", default="999,1000,1001")
    parser.add_argument(
        "--stopping-step",
        type=int,
        default=None,
        help="early-stopping patience for every model (default: each model's own)",
    )
    args = parser.parse_args()
    suffix = "" if args.stopping_step is None else f"-patience{args.stopping_step}"
    out = Path(args.out)
    source = Path(args.data_root) / "ml-100k"
    prepared = out / "data" / NAME
    if not (prepared / "prepare.json").exists():
        options = PrepareOptions(
            user_col="user_id:token",
            item_col="item_id:token",
            time_col="timestamp:float",
            items=source / "ml-100k.item",
            item_id_col="item_id:token",
            text_cols=("movie_title:token_seq", "class:token_seq"),
        )
        prepare_dataset(source / "ml-100k.inter", prepared, options, progress=True)
    data, name = load_dataset(str(out / "data"), NAME)
    results: dict[str, dict[str, dict]] = {}
    for model in args.models.split(","):
        cls = get_model_class(model)
        for seed in (int(s) for s in args.seeds.split(",")):
            run_dir = out / f"{model}-seed{seed}{suffix}"
            metrics_path = run_dir / "metrics.json"
            if not metrics_path.exists():
                overrides: dict[str, int] = {"seed": seed}
                if args.stopping_step is not None:
                    overrides["stopping_step"] = args.stopping_step
                config = load_config(cls.default_config(), None, overrides)
                run_experiment(data, model, config, run_dir, name, progress=False, overwrite=True)
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            results.setdefault(model, {})[str(seed)] = {
                "stopping_step": metrics["config"]["stopping_step"],
                "best_epoch": metrics["best_epoch"],
                "valid": metrics["valid"],
                "test": metrics["test"],
                "seconds_per_epoch": statistics.median(metrics["epoch_seconds"]),
            }
            print(model, seed, metrics["test"]["recall@20"], metrics["test"]["ndcg@20"])
    atomic_write_text(out / f"results{suffix}.json", json.dumps(results, indent=2) + "\n")
    lines = [
        "| model | modalities | patience | valid R@20 | test R@20 | test N@20 | best epochs | "
        "s/epoch (median) | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, by_seed in results.items():
        runs = list(by_seed.values())

        def stat(split: str, key: str, runs: list[dict] = runs) -> str:
            values = [r[split][key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.4f} ± {spread:.4f}"

        modalities = "text (MiniLM)" if get_model_class(model).min_modalities else "none"
        seconds = statistics.median(r["seconds_per_epoch"] for r in runs)
        epochs = ", ".join(str(r["best_epoch"]) for r in runs)
        lines.append(
            f"| {model} | {modalities} | {runs[0]['stopping_step']} | "
            f"{stat('valid', 'recall@20')} | {stat('test', 'recall@20')} | "
            f"{stat('test', 'ndcg@20')} | {epochs} | {seconds:.2f} | {len(runs)} |"
        )
    atomic_write_text(out / f"results{suffix}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
