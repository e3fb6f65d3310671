"""Training steps with glibc serving large blocks from ``mmap`` against from the heap only.

    python -m benchmarks.allocator --inputs /scratch/elec-inputs.pt --rounds 2 \\
        --out benchmarks/results/allocator-elec.json          # distributed_memory --build
    python -m benchmarks.allocator --scale baby --data-root ../shared/data \\
        --models cm3,lirdrec,bm3,freedom --rounds 2

:func:`~cm3_pyg.training.memory.retain_freed_memory` with ``heap_only=False`` ("mapped":
blocks above glibc's 32 MiB mmap cap are mapped and unmapped per use) and with the default
``heap_only=True`` ("heap"). The setting is process-wide and the allocator's state lasts,
so each side runs in a fresh process, alternating mapped, heap per round; each process builds
the model with its YAML defaults, times ``--steps`` trainer steps after ``--warmup``
(:func:`benchmarks.step_phases.time_phases`) and reports its peak resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VARIANTS = ("mapped", "heap")


def child(variant: str, model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One side in this (fresh) process."""
    from cm3_pyg.training.memory import retain_freed_memory

    applied = retain_freed_memory(heap_only=variant == "heap")  # before anything allocates
    import torch

    from benchmarks.run import load_scale
    from benchmarks.step_phases import time_phases
    from cm3_pyg.models import get_model_class
    from cm3_pyg.training import load_config
    from cm3_pyg.training.inputs import build_graph_inputs, get_splits
    from cm3_pyg.training.trainer import Trainer, seed_everything

    cls = get_model_class(model_name)
    if args.inputs is not None:  # distributed_memory --build's file (CM3's inputs)
        saved = torch.load(args.inputs, weights_only=False)
        inputs, splits = saved["inputs"], saved["splits"]
        config = load_config(cls.default_config(), None, {"sparse_backend": "csr"})
    else:
        data = load_scale(args.scale, args.data_root, args.cache_dir)
        config = load_config(cls.default_config(), None, {})
        inputs = build_graph_inputs(data, config, uses_item_graph=cls.uses_item_graph)
        splits = get_splits(data)
    seed_everything(int(config["seed"]))
    trainer = Trainer(cls.from_config(config, inputs), inputs, splits, config, progress=False)
    times = time_phases(trainer, args.steps, args.warmup)
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return {
        "variant": variant,
        "model": model_name,
        "applied": applied,
        "step_s": times["step"],
        "peak_mib": peak / 1024,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, help="a benchmarks.distributed_memory file")
    parser.add_argument("--scale", default="elec", help="a suite scale (without --inputs)")
    parser.add_argument("--data-root", default=os.environ.get("CM3_DATA_ROOT"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--models", default="cm3")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write every process's record (JSON)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    models = [m for m in args.models.split(",") if m]
    if args.inputs is not None and models != ["cm3"]:
        parser.error("--inputs holds CM3's inputs: use --models cm3")
    if args.child is not None:
        print(json.dumps(child(args.child, models[0], args)))
        return
    records: list[dict[str, Any]] = []
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--out"]
    if args.out is not None:
        passed = [a for a in passed if a != str(args.out)]
    for model in models:
        for _ in range(args.rounds):
            for variant in VARIANTS:
                command = [sys.executable, "-m", "benchmarks.allocator", *passed]
                command += ["--models", model, "--child", variant]
                out = subprocess.run(
                    command,
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=Path(__file__).resolve().parents[1],
                ).stdout
                records.append(json.loads(out.strip().splitlines()[-1]))
                last = records[-1]
                print(
                    f"{model} {variant}: steps {[round(s, 3) for s in last['step_s']]} s, "
                    f"peak {last['peak_mib']:,.0f} MiB",
                    flush=True,
                )
    print(
        "| model | mapped s/step | heap s/step | heap / mapped | mapped peak MiB | heap peak MiB |"
    )
    print("|---|---|---|---|---|---|")
    for model in models:
        side = {
            v: [r for r in records if r["model"] == model and r["variant"] == v] for v in VARIANTS
        }
        step = {v: statistics.median(s for r in side[v] for s in r["step_s"]) for v in VARIANTS}
        peak = {v: max(r["peak_mib"] for r in side[v]) for v in VARIANTS}
        print(
            f"| {model} | {step['mapped']:.3f} | {step['heap']:.3f} | "
            f"{step['heap'] / step['mapped']:.2f} | {peak['mapped']:,.0f} | {peak['heap']:,.0f} |"
        )
    if args.out is not None:
        from cm3_pyg.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
