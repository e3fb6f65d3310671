"""Full-ranking evaluation at Elec scale against its scoring-GEMM floor, side by side.

    python -m benchmarks.eval_floor                 # Elec scale: 192,403 users x 63,001 items
    python -m benchmarks.eval_floor --small         # seconds, for a smoke run
    python -m benchmarks.eval_floor --rounds 3 --out benchmarks/results/eval-floor.json

The floor is the evaluation's unavoidable arithmetic: for every batch of evaluated users
the score GEMM ``user_emb[batch] @ item_emb.T`` into one reused output buffer (no
allocation, no masking, no ranking: the evaluator's own batches and scorer). Each round
times the floor over all batches, then
:meth:`~cm3_pyg.metrics.FullRankingEvaluator.evaluate`; rounds alternate so that a slow
phase of this shared machine hits both alike, and the medians and the ratio
``evaluate / floor`` are printed.
Embeddings are random (width 192 = CM3's 3 channels x 64); the interactions are
:func:`benchmarks.scales.scale_interactions`' Elec graph, test split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.scales import ELEC_SCALE, SMALL_SCALE, scale_interactions
from cm3_pyg.io import atomic_write_text
from cm3_pyg.metrics import FullRankingEvaluator
from cm3_pyg.training.memory import retain_freed_memory


def floor_seconds(
    evaluator: FullRankingEvaluator, user_emb: torch.Tensor, item_emb: torch.Tensor
) -> float:
    """Seconds of the score GEMMs of every batch of ``evaluator`` (its batches and its
    one-buffer scorer, as ``evaluate`` runs them), without the masks and the ranking."""
    score = evaluator._dot_scorer(user_emb, item_emb)  # checks the embeddings: not timed
    start = time.perf_counter()
    for users, _, _ in evaluator._batches():
        score(users)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a test-sized graph")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None, help="write the timings as JSON")
    args = parser.parse_args(argv)
    retain_freed_memory()
    scale = SMALL_SCALE if args.small else ELEC_SCALE
    users, items, labels = scale_interactions(
        0, scale.num_users, scale.num_items, scale.num_interactions
    )
    pairs = torch.stack([torch.from_numpy(users), torch.from_numpy(items)])
    labels_t = torch.from_numpy(labels)
    evaluator = FullRankingEvaluator(
        scale.num_items,
        pairs[:, labels_t == 0],
        pairs[:, labels_t == 2],
        batch_size=args.batch_size,
    )
    generator = torch.Generator().manual_seed(0)
    user_emb = torch.randn(scale.num_users, args.width, generator=generator)
    item_emb = torch.randn(scale.num_items, args.width, generator=generator)
    print(
        f"{scale.num_users} users x {scale.num_items} items, {evaluator.num_eval_users} "
        f"evaluated in {evaluator.num_batches} batches of {args.batch_size}; "
        f"{torch.get_num_threads()} threads"
    )
    floors, evals = [], []
    for r in range(args.rounds):
        floors.append(floor_seconds(evaluator, user_emb, item_emb))
        start = time.perf_counter()
        metrics = evaluator.evaluate(user_emb, item_emb)
        evals.append(time.perf_counter() - start)
        print(f"round {r}: floor {floors[-1]:.2f} s, evaluate {evals[-1]:.2f} s")
    floor, full = statistics.median(floors), statistics.median(evals)
    flops = 2.0 * evaluator.num_eval_users * scale.num_items * args.width
    print(
        f"median: floor {floor:.2f} s ({flops / floor / 1e9:.0f} GFLOP/s), evaluate "
        f"{full:.2f} s ({evaluator.num_eval_users / full:.0f} users/s), "
        f"ratio {full / floor:.2f}"
    )
    if args.out is not None:
        record = {
            "scale": "small" if args.small else "elec",
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "width": args.width,
            "eval_users": evaluator.num_eval_users,
            "floor_s": floors,
            "evaluate_s": evals,
            "ratio": full / floor,
            "recall@20": metrics["recall@20"],
        }
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
