"""``precision: bf16`` against float32: step time side by side in one process.

    python -m benchmarks.precision --scale baby --models cm3,lirdrec --data-root ../shared/data
    python -m benchmarks.precision --scale synthetic --steps 4 --rounds 2

For each model, two trainers are built on the same data with the same seed, one per
precision, and their steps (:func:`benchmarks.step_phases.time_phases`: the trainer's own
batches, negatives, loss, backward and optimizer step under its precision) alternate
float32, bf16, bf16, float32 per round, so a slow phase of the machine hits both alike.
Prints each side's median step and the ratio bf16 / float32, and the two sides' loss on
the same first batch (same parameters, same batch: the loss difference is the precision's
alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.run import load_scale
from benchmarks.step_phases import time_phases
from cm3_pyg.models import Batch, get_model_class
from cm3_pyg.nn.precision import matmul_precision, precision_supported
from cm3_pyg.training import load_config
from cm3_pyg.training.inputs import build_graph_inputs, get_splits
from cm3_pyg.training.memory import retain_freed_memory
from cm3_pyg.training.trainer import Trainer, seed_everything

SIDES = ("float32", "bf16")


def _trainer(name: str, data: Any, inputs: Any, precision: str) -> Trainer:
    cls = get_model_class(name)
    config = load_config(cls.default_config(), None, {"device": "cpu", "precision": precision})
    seed_everything(int(config["seed"]))
    model = cls.from_config(config, inputs)
    return Trainer(model, inputs, get_splits(data), config, progress=False)


def first_batch_loss(trainer: Trainer) -> float:
    """The loss of the trainer's first training batch (fixed rows, seeded negatives), at its
    current parameters and precision."""
    train = trainer.splits.train
    size = min(int(trainer.config["train_batch_size"]), train.size(1))
    users, pos = train[0, :size], train[1, :size]
    neg = trainer.sampler.sample(users, torch.Generator().manual_seed(0))
    trainer.model.train()
    with torch.no_grad(), matmul_precision(trainer.precision):
        torch.manual_seed(0)  # models that draw in their forward (CM3's fusion parameter)
        return float(trainer.model.loss_terms(trainer.inputs, Batch(users, pos, neg)).total)


def compare(name: str, data: Any, steps: int, warmup: int, rounds: int) -> dict[str, Any]:
    """Both precisions' step times of one model, interleaved (see the module docstring)."""
    cls = get_model_class(name)
    base = load_config(cls.default_config(), None, {"device": "cpu"})
    inputs = build_graph_inputs(data, base, uses_item_graph=cls.uses_item_graph)
    trainers = {side: _trainer(name, data, inputs, side) for side in SIDES}
    losses = {side: first_batch_loss(trainers[side]) for side in SIDES}
    steps_of: dict[str, list[float]] = {side: [] for side in SIDES}
    warmed: set[str] = set()
    for _ in range(rounds):
        for side in (*SIDES, *reversed(SIDES)):
            times = time_phases(trainers[side], steps, 0 if side in warmed else warmup)
            warmed.add(side)
            steps_of[side].extend(times["step"])
    medians = {side: statistics.median(values) for side, values in steps_of.items()}
    return {
        "model": name,
        "threads": torch.get_num_threads(),
        "steps_per_side": {side: len(v) for side, v in steps_of.items()},
        "step_seconds": steps_of,
        "median_step_s": medians,
        "ratio_bf16": medians["bf16"] / medians["float32"],
        "first_batch_loss": losses,
        "loss_relative_difference": abs(losses["bf16"] - losses["float32"])
        / max(abs(losses["float32"]), 1e-12),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="baby", help="a suite scale (synthetic, tiktok, baby)")
    parser.add_argument("--models", default="cm3")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side per turn")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="float32 bf16 bf16 float32 rounds")
    parser.add_argument("--data-root", default=os.environ.get("CM3_DATA_ROOT"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if not precision_supported("bf16", "cpu"):
        parser.error("this CPU has no native bfloat16 products (AVX-512 BF16 or AMX)")
    retain_freed_memory()  # as the training CLIs
    data = load_scale(args.scale, args.data_root, args.cache_dir)
    results = []
    for name in (m for m in args.models.split(",") if m):
        result = compare(name, data, args.steps, args.warmup, args.rounds)
        result["scale"] = args.scale
        results.append(result)
        med = result["median_step_s"]
        loss = result["first_batch_loss"]
        print(
            f"{args.scale} {name}: float32 {med['float32'] * 1e3:.1f} ms, bf16 "
            f"{med['bf16'] * 1e3:.1f} ms per step (ratio {result['ratio_bf16']:.3f}); first "
            f"batch loss {loss['float32']:.6f} / {loss['bf16']:.6f}",
            flush=True,
        )
    if args.out:
        from cm3_pyg.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
