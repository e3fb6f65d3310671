"""The accuracy effect of ``precision: bf16``: the same point and seeds trained both ways.

    python -m benchmarks.precision_accuracy \\
        --float32 benchmarks/results/grid-tiktok/runs/cm3/<point> \\
        --bf16 benchmarks/results/precision-tiktok/runs/cm3/<point> --out RESULT.md

Each folder holds one ``seed<s>/`` run per seed (``metrics.json``; ``test_users.csv`` where
kept). Both must hold the same seeds and the same configuration apart from ``precision``
(checked). Prints, per seed, test Recall@20 / NDCG@20 and the validation score, then paired
t-tests float32 against bf16: over the seeds (test metrics from ``metrics.json``) and, where
every run kept ``test_users.csv``, over the test users (each user's metric averaged over the
seeds), with the sign-flip test.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cm3_pyg.experiments.significance import PairedTest, paired_t_test
from cm3_pyg.io import atomic_write_text
from cm3_pyg.training import TEST_USERS_NAME, read_user_metrics

METRICS = ("recall@20", "ndcg@20", "recall@10", "ndcg@10")


def load_runs(folder: Path) -> dict[int, dict[str, Any]]:
    """``{seed: metrics.json}`` of the finished runs under ``folder``."""
    runs = {}
    for file in sorted(folder.glob("seed*/metrics.json")):
        metrics = json.loads(file.read_text(encoding="utf-8"))
        if metrics.get("stop_reason") in ("completed", "early_stopping"):
            runs[int(metrics["config"]["seed"])] = metrics
    return runs


def check_same_point(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The two runs' configurations differ in ``precision`` only."""
    ca, cb = dict(a["config"]), dict(b["config"])
    for config in (ca, cb):
        config.pop("precision", None)
    differing = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    if differing:
        raise SystemExit(f"the runs differ in more than precision: {differing}")


def _row(test: PairedTest, metric: str, over: str) -> str:
    rand = "" if test.p_randomization is None else f"{test.p_randomization:.3g}"
    return (
        f"| {metric} | {over} | {test.n} | {test.mean_a:.4f} | {test.mean_b:.4f} | "
        f"{test.mean_difference:+.4f} | {test.effect_size:+.3f} | {test.p_value:.3g} | {rand} |"
    )


def report(float32: Path, bf16: Path, samples: int = 10_000) -> str:
    """The Markdown comparison of the two folders (see the module docstring)."""
    a, b = load_runs(float32), load_runs(bf16)
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise SystemExit(f"fewer than two seeds in both folders: {sorted(a)} and {sorted(b)}")
    for seed in seeds:
        check_same_point(a[seed], b[seed])
    lines = [
        "| seed | float32 valid R@20 | bf16 valid R@20 | float32 test R@20 | bf16 test R@20 "
        "| float32 test N@20 | bf16 test N@20 | float32 best epoch | bf16 best epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        x, y = a[seed], b[seed]
        lines.append(
            f"| {seed} | {x['valid']['recall@20']:.4f} | {y['valid']['recall@20']:.4f} | "
            f"{x['test']['recall@20']:.4f} | {y['test']['recall@20']:.4f} | "
            f"{x['test']['ndcg@20']:.4f} | {y['test']['ndcg@20']:.4f} | "
            f"{x['best_epoch']} | {y['best_epoch']} |"
        )
    lines += [
        "",
        "| metric | over | n | float32 | bf16 | difference | effect size d_z | p (t-test) "
        "| p (sign flip) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    users_ok = all(
        (folder / f"seed{seed}" / TEST_USERS_NAME).exists()
        for folder in (float32, bf16)
        for seed in seeds
    )
    for metric in METRICS:
        test = paired_t_test(
            [a[s]["test"][metric] for s in seeds],
            [b[s]["test"][metric] for s in seeds],
            ("float32", "bf16"),
        )
        lines.append(_row(test, metric, "seeds"))
        if users_ok:
            per_side = []
            for folder in (float32, bf16):
                tables = [read_user_metrics(folder / f"seed{s}" / TEST_USERS_NAME) for s in seeds]
                per_side.append(sum(t.values[metric] for t in tables) / len(tables))
            test = paired_t_test(*per_side, ("float32", "bf16"), randomization_samples=samples)
            lines.append(_row(test, metric, "users"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float32", type=Path, required=True, help="folder of seed*/ runs")
    parser.add_argument("--bf16", type=Path, required=True, help="folder of seed*/ runs")
    parser.add_argument("--out", help="also write the tables (Markdown) here")
    args = parser.parse_args(argv)
    text = report(args.float32, args.bf16)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
