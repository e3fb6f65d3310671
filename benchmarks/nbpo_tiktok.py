"""NBPO against BPR on TikTok: the table of issue 15 from ``compare_models`` outputs.

Each objective is one ``compare_models`` run over the same small grid, selected on
validation Recall@20 (3 seeds). The commands are in ``results/nbpo-tiktok.md``; this script
reads their ``results.csv`` files and writes the side-by-side table::

    python -m benchmarks.nbpo_tiktok --bpr DIR [DIR ...] --nbpo DIR [DIR ...] \
        --out benchmarks/results/nbpo-tiktok
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from cm3_pyg.io import atomic_write_text

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def read_rows(folders: list[str]) -> dict[str, dict[str, str]]:
    """``results.csv`` rows of the given compare folders, by model."""
    rows: dict[str, dict[str, str]] = {}
    for folder in folders:
        with open(Path(folder) / "results.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                rows[row["model"]] = row
    return rows


def table(bpr: dict[str, dict[str, str]], nbpo: dict[str, dict[str, str]]) -> tuple[str, dict]:
    lines = [
        "| model | objective | selected point | valid R@20 | test R@10 | test R@20 | "
        "test N@10 | test N@20 | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    record: dict[str, dict] = {}
    for model in sorted(set(bpr) & set(nbpo)):
        record[model] = {}
        for objective, rows in (("bpr", bpr), ("nbpo", nbpo)):
            row = rows[model]
            cells = [
                f"{float(row['valid_recall@20_mean']):.4f} ± "
                f"{float(row['valid_recall@20_std']):.4f}"
            ]
            values = {"point": row["point"], "valid_recall@20": float(row["valid_recall@20_mean"])}
            for metric in METRICS:
                mean, std = float(row[f"test_{metric}_mean"]), float(row[f"test_{metric}_std"])
                cells.append(f"{mean:.4f} ± {std:.4f}")
                values[f"test_{metric}"] = mean
                values[f"test_{metric}_std"] = std
            seconds = float(row["seconds_per_epoch_median"])
            values["seconds_per_epoch"] = seconds
            record[model][objective] = values
            lines.append(
                f"| {model} | {objective} | {row['point'].replace('__', ', ')} | "
                + " | ".join(cells)
                + f" | {seconds:.3f} |"
            )
        diff = record[model]["nbpo"]["test_recall@20"] - record[model]["bpr"]["test_recall@20"]
        record[model]["nbpo_minus_bpr_test_recall@20"] = diff
    return "\n".join(lines) + "\n", record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpr", nargs="+", required=True)
    parser.add_argument("--nbpo", nargs="+", required=True)
    parser.add_argument("--out", required=True, help="output stem (.md table, .json)")
    args = parser.parse_args()
    text, record = table(read_rows(args.bpr), read_rows(args.nbpo))
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".table.md"), text)
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
