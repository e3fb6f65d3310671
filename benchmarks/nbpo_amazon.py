"""NBPO against BPR on the NBPO paper's Amazon data, under the paper code's protocol.

    python -m benchmarks.nbpo_amazon --data-root ../shared/data --seeds 999,1000,1001

Trains BPR-MF with ``datasets/nbpo-amazon.yaml`` once per seed and objective (``bpr`` and
``nbpo`` by default; ``--objectives`` adds ``bpo`` or ``nbpo_original``), each run's test
metrics taken at its best validation NDCG@20, and writes
``benchmarks/results/nbpo-amazon.{json,md}``: the mean and spread over seeds of F1@5/10/20
and NDCG@5/10/20 beside the published rows, and the median seconds per training epoch of
each objective (the flip model's cost), all measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from cm3_pyg.data.loading import load_dataset
from cm3_pyg.models import get_model_class
from cm3_pyg.training import load_config, run_experiment
from cm3_pyg.training.experiment import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIG = REPO / "datasets" / "nbpo-amazon.yaml"
METRICS = ("f1@5", "f1@10", "f1@20", "ndcg@5", "ndcg@10", "ndcg@20")
#: shared/docs/nbpo-and-unlearning.md, section 1 (d = 50, the same data).
PUBLISHED = {
    "BPR, published": (0.0326, 0.0317, 0.0275, 0.0444, 0.0551, 0.0680),
    "NBPO, published": (0.0401, 0.0357, 0.0313, 0.0555, 0.0655, 0.0810),
}


def run(
    data_root: str, seeds: list[int], objectives: list[str], epochs: int | None = None
) -> dict[str, Any]:
    data, _ = load_dataset(data_root, "nbpo-amazon")
    cls = get_model_class("bprmf")
    runs = []
    for seed in seeds:
        for objective in objectives:
            overrides: dict[str, Any] = {"objective": objective, "seed": seed}
            if epochs is not None:
                overrides["epochs"] = epochs
            config = load_config(cls.default_config(), CONFIG, overrides)
            with tempfile.TemporaryDirectory() as out:
                metrics = run_experiment(
                    data, "bprmf", config, out_dir=out, dataset_name="nbpo-amazon", progress=False
                )
            runs.append(
                {
                    "objective": objective,
                    "seed": seed,
                    "best_epoch": metrics["best_epoch"],
                    "epochs_run": metrics["epochs_run"],
                    "median_epoch_seconds": statistics.median(metrics["epoch_seconds"]),
                    "test": {k: metrics["test"][k] for k in METRICS},
                    "valid_ndcg@20": metrics["valid"]["ndcg@20"],
                }
            )
            print(
                f"{objective} seed {seed}: best epoch {metrics['best_epoch']}, "
                f"test ndcg@20 {metrics['test']['ndcg@20']:.4f}",
                flush=True,
            )
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "config": str(CONFIG.relative_to(REPO)),
        "seeds": seeds,
        "runs": runs,
        "summary": summarize(runs, objectives),
        "published": {k: dict(zip(METRICS, v, strict=True)) for k, v in PUBLISHED.items()},
    }


def summarize(runs: list[dict[str, Any]], objectives: list[str]) -> dict[str, Any]:
    """Per objective: mean and sample std over seeds of each metric, median s/epoch."""
    summary = {}
    for objective in objectives:
        mine = [r for r in runs if r["objective"] == objective]
        spread = statistics.stdev if len(mine) > 1 else (lambda _: 0.0)
        summary[objective] = {
            "mean": {k: statistics.fmean(r["test"][k] for r in mine) for k in METRICS},
            "std": {k: spread([r["test"][k] for r in mine]) for k in METRICS},
            "median_epoch_seconds": statistics.median(r["median_epoch_seconds"] for r in mine),
        }
    return summary


def report(result: dict[str, Any]) -> str:
    header = "| source | " + " | ".join(m.replace("ndcg", "N").replace("f1", "F1") for m in METRICS)
    lines = [
        "# NBPO against BPR on nbpo-amazon (BPR-MF, d = 50)",
        "",
        f"`python -m benchmarks.nbpo_amazon` with `{result['config']}` (the NBPO code's "
        f"protocol: 4 negatives from all items, chunks of 5,000 with summed gradients, SGD "
        f"0.05 x0.99 per epoch, lambda_r 1, lambda_phi 5, 200 epochs, no early stopping). "
        f"Seeds {', '.join(map(str, result['seeds']))}; test at each run's best validation "
        "NDCG@20; mean +- sample std over seeds.",
        "",
        header + " | s/epoch |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for name, values in result["published"].items():
        lines.append(f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in METRICS) + " | |")
    for objective, s in result["summary"].items():
        cells = " | ".join(f"{s['mean'][m]:.4f} +- {s['std'][m]:.4f}" for m in METRICS)
        lines.append(f"| {objective}, ours | {cells} | {s['median_epoch_seconds']:.3f} |")
    lines += ["", "Every run:", "", "| objective | seed | best epoch | test N@20 | test F1@20 |"]
    lines.append("|---|---|---|---|---|")
    for r in result["runs"]:
        lines.append(
            f"| {r['objective']} | {r['seed']} | {r['best_epoch']} | "
            f"{r['test']['ndcg@20']:.4f} | {r['test']['f1@20']:.4f} |"
        )
    machine = result["machine"]
    lines += [
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']} "
        f"({machine['threads']} threads). Seconds per epoch are the median over each "
        "objective's runs of their median training epoch, measured side by side in this run.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("CM3_DATA_ROOT", "../shared/data"))
    parser.add_argument("--seeds", default="999,1000,1001")
    parser.add_argument("--objectives", default="bpr,nbpo")
    parser.add_argument("--epochs", type=int, default=None, help="override the 200 epochs")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default="nbpo-amazon")
    parser.add_argument(
        "--from-json", default=None, help="rewrite the tables from a recorded JSON (no runs)"
    )
    args = parser.parse_args()
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        result["summary"] = summarize(result["runs"], list(result["summary"]))
    else:
        seeds = [int(s) for s in args.seeds.split(",")]
        result = run(args.data_root, seeds, args.objectives.split(","), args.epochs)
    out = Path(args.out)
    atomic_write_text(out / f"{args.tag}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / f"{args.tag}.md", report(result))
    print(report(result))


if __name__ == "__main__":
    main()
