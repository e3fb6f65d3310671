"""Issue 16's measurement: forget 5% of users, 5% of items, or the image rows of 10% of the
items of a trained run; compare the unlearned model with gold (retrained on the retain data)
and retain-only fine-tuning.

python -m benchmarks.unlearning_tiktok --data-root ../shared/data --models lightgcn,cm3 \
    --seeds 999,1000,1001 --out runs/unlearning-tiktok

Trains (or reuses) one run per model and seed and one gold run per request (in
``OUT/<model>-seed<seed>-gold-<kind>``, so a change of the procedure is re-measured without
retraining gold), draws the requests with a generator seeded by the run's seed, runs
``cm3_pyg.unlearning.unlearn_run`` with ``finetune`` against that gold run, and writes
``results.json`` plus a markdown table of the per-seed values and their means. The modality
request is skipped for models that read no features.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from cm3_pyg.data.loading import load_dataset
from cm3_pyg.io import atomic_write_text
from cm3_pyg.models import get_model_class
from cm3_pyg.training import load_config
from cm3_pyg.training.experiment import run_experiment
from cm3_pyg.training.inputs import get_splits
from cm3_pyg.unlearning import ForgetRequest, build_retain_data, unlearn_run


def requests(
    data, seed: int, fraction: float, modality: str, modality_fraction: float
) -> dict[str, ForgetRequest]:
    generator = torch.Generator().manual_seed(seed)
    train = get_splits(data).train
    users = torch.unique(train[0])
    items = torch.unique(train[1])
    pick_users = users[torch.randperm(users.numel(), generator=generator)]
    pick_items = items[torch.randperm(items.numel(), generator=generator)]
    all_items = torch.randperm(data["item"].num_nodes, generator=generator)
    some = all_items[: round(modality_fraction * all_items.numel())].sort().values
    return {
        "users": ForgetRequest(
            "users", pick_users[: round(fraction * users.numel())].sort().values
        ),
        "items": ForgetRequest(
            "items", pick_items[: round(fraction * items.numel())].sort().values
        ),
        "modality": ForgetRequest("modality", some, modality),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default="tiktok")
    parser.add_argument("--cache-dir")
    parser.add_argument("--models", default="lightgcn")
    parser.add_argument("--seeds", default="999,1000,1001")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--kinds", default="users,items,modality")
    parser.add_argument("--modality", default="image")
    parser.add_argument("--modality-fraction", type=float, default=0.1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    data, name = load_dataset(args.data_root, args.dataset, cache_dir=args.cache_dir)
    results: dict[str, dict] = {}
    for model in args.models.split(","):
        cls = get_model_class(model)
        for seed in (int(s) for s in args.seeds.split(",")):
            config = load_config(cls.default_config(), None, {"seed": seed})
            run_dir = out / f"{model}-seed{seed}"
            if not (run_dir / "metrics.json").exists():
                run_experiment(data, model, config, run_dir, name, progress=False, overwrite=True)
            drawn = requests(data, seed, args.fraction, args.modality, args.modality_fraction)
            for kind in args.kinds.split(","):
                request = drawn[kind]
                if kind == "modality" and cls.min_modalities == 0:
                    continue
                gold = out / f"{model}-seed{seed}-gold-{kind}"
                if not (gold / "metrics.json").exists():
                    retain = build_retain_data(data, request)
                    run_experiment(
                        retain.data, model, config, gold, name, progress=False, overwrite=True
                    )
                target = out / f"{model}-seed{seed}-forget-{kind}"
                if (target / "unlearn.json").exists():
                    report = json.loads((target / "unlearn.json").read_text(encoding="utf-8"))
                else:
                    report = unlearn_run(
                        run_dir, request, target, finetune=True, gold_run=gold, data=data
                    )
                results.setdefault(f"{model}/{kind}", {})[str(seed)] = report
                print(
                    model,
                    seed,
                    kind,
                    {
                        k: (
                            report[k]["forget"]["recall@20"],
                            report[k]["test"]["recall@20"],
                            round(report[k]["seconds"], 1),
                        )
                        for k in ("original", "unlearned", "finetune", "gold")
                    },
                )
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    lines = [
        "| model / request | seed | forget R@20: original, unlearned, finetune, gold | "
        "unlearned vs gold (rel.) | test R@20: original, unlearned, finetune, gold | "
        "unlearned / original test | seconds: unlearn, finetune, gold | unlearn / gold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, by_seed in results.items():
        ratios = []
        for seed, r in by_seed.items():
            f = [r[k]["forget"]["recall@20"] for k in ("original", "unlearned", "finetune", "gold")]
            t = [r[k]["test"]["recall@20"] for k in ("original", "unlearned", "finetune", "gold")]
            s = [r[k]["seconds"] for k in ("unlearned", "finetune", "gold")]
            rel = abs(f[1] - f[3]) / f[3] if f[3] > 0 else float("inf") if f[1] else 0.0
            ratios.append((rel, t[1] / t[0], s[0] / s[2]))
            lines.append(
                f"| {key} | {seed} | "
                + ", ".join(f"{v:.4f}" for v in f)
                + f" | {rel:.2f} | "
                + ", ".join(f"{v:.4f}" for v in t)
                + f" | {t[1] / t[0]:.3f} | "
                + ", ".join(f"{v:.1f}" for v in s)
                + f" | {s[0] / s[2]:.3f} |"
            )
        means = [statistics.mean(col) for col in zip(*ratios, strict=True)]
        lines.append(f"| {key} | mean | | {means[0]:.2f} | | {means[1]:.3f} | | {means[2]:.3f} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
