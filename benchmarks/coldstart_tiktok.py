"""Issue 17's cold-start measurement: TikTok with 10% of the items held out whole.

python -m benchmarks.coldstart_tiktok --data-root ../shared/data --models cm3 \
    --seeds 999,1000,1001 --out runs/coldstart-tiktok

Each run trains with ``cold_items: 0.1`` (the held-out items drawn with the run's seed, their
features kept) and its defaults otherwise; ``metrics.json``'s ``cold`` ranks the held-out
items for their users. Writes ``results.json`` and ``results.md``: Recall/NDCG@20 on the cold
items for the model, the features-only nearest-neighbour baseline and a random ranking
(exact expectation), mean ± std over seeds, and the warm test R@20 beside them. Finished
runs are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cm3_pyg.data.loading import load_dataset
from cm3_pyg.io import atomic_write_text
from cm3_pyg.models import get_model_class
from cm3_pyg.training import load_config
from cm3_pyg.training.experiment import run_experiment


def _stat(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default="tiktok")
    parser.add_argument("--cache-dir")
    parser.add_argument("--models", default="cm3")
    parser.add_argument("--seeds", default="999,1000,1001")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    data, name = load_dataset(args.data_root, args.dataset, cache_dir=args.cache_dir)
    results: dict[str, dict[str, dict]] = {}
    for model in args.models.split(","):
        cls = get_model_class(model)
        for seed in (int(s) for s in args.seeds.split(",")):
            run_dir = out / f"{model}-seed{seed}"
            if not (run_dir / "metrics.json").exists():
                overrides = {"seed": seed, "cold_items": args.fraction}
                config = load_config(cls.default_config(), None, overrides)
                run_experiment(data, model, config, run_dir, name, progress=False, overwrite=True)
            metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            results.setdefault(model, {})[str(seed)] = {
                "cold": metrics["cold"],
                "test": metrics["test"],
                "best_epoch": metrics["best_epoch"],
            }
            cold = metrics["cold"]
            kinds = ("model", "feature_knn", "random")
            print(model, seed, {k: cold[k]["recall@20"] for k in kinds})
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    lines = [
        "| model | cold items / interactions | cold R@20: model | feature kNN | random | "
        "cold N@20: model | feature kNN | random | warm test R@20 | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, by_seed in results.items():
        runs = list(by_seed.values())

        def col(kind: str, key: str, runs: list[dict] = runs) -> str:
            return _stat([r["cold"][kind][key] for r in runs])

        sizes = f"{runs[0]['cold']['items']} / {runs[0]['cold']['interactions']}"
        lines.append(
            f"| {model} | {sizes} | {col('model', 'recall@20')} | "
            f"{col('feature_knn', 'recall@20')} | {col('random', 'recall@20')} | "
            f"{col('model', 'ndcg@20')} | {col('feature_knn', 'ndcg@20')} | "
            f"{col('random', 'ndcg@20')} | {_stat([r['test']['recall@20'] for r in runs])} | "
            f"{len(runs)} |"
        )
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
