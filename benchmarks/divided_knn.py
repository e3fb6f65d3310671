"""The item kNN search of set-up, undivided and divided among processes (issue 19).

    python -m benchmarks.divided_knn --items 7050 --dim 4096 --nproc 1,2 \\
        --out benchmarks/results/divided-knn.json

Every process of a multi-process run builds the same item kNN graphs; with a world,
:func:`~cm3_pyg.training.inputs.build_graph_inputs` divides the query rows among the
processes (:func:`~cm3_pyg.training.distributed.divided_cosine_topk`). For each process count
this times the search of one random ``[items, dim]`` table (``torchrun --nproc_per_node P``,
one thread per process; one plain process for ``P = 1``; the median of ``--repeats``), checks
that every process ends with the undivided neighbours, and prints the wall time of the
slowest process against one process's. On a machine with fewer cores than ``P`` the
processes share them, so the ratio there shows the divided work, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _table(items: int, dim: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.rand(items, dim, generator=gen)


def worker(out: Path, items: int, dim: int, k: int, repeats: int) -> None:
    import torch.distributed as dist

    from cm3_pyg.data.graphs import cosine_topk
    from cm3_pyg.training.distributed import divided_cosine_topk, world_from_env

    x = _table(items, dim)
    world = world_from_env("cpu")
    seconds = []
    for _ in range(repeats):
        if world is not None:
            dist.barrier()
        start = time.perf_counter()
        if world is None:
            _, indices = cosine_topk(x, k)
        else:
            _, indices = divided_cosine_topk(x, k, split=world.split)
        seconds.append(time.perf_counter() - start)
    record = {
        "seconds": seconds,
        "median_s": statistics.median(seconds),
        "digest": int(indices.sum()) * 1_000_003 + int((indices * indices).sum()),
    }
    every = [record]
    if world is not None:
        every = [None] * world.world_size
        dist.all_gather_object(every, record)
    if world is None or world.rank == 0:
        out.write_text(json.dumps(every), encoding="utf-8")


def launch(nproc: int, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    from benchmarks.distributed_parity import run_module

    worker_args = ["--worker", str(out), "--items", str(args.items), "--dim", str(args.dim)]
    worker_args += ["--k", str(args.k), "--repeats", str(args.repeats)]
    return run_module(
        nproc, "benchmarks.divided_knn", worker_args, out, env={"OMP_NUM_THREADS": "1"}
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=7050)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nproc", default="1,2", help="comma-separated process counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the records (JSON)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("items", "dim", "k", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.k > args.items:
        parser.error(f"--k must be at most --items ({args.items}), got {args.k}")
    if args.worker is not None:
        worker(args.worker, args.items, args.dim, args.k, args.repeats)
        return
    counts = [int(p) for p in args.nproc.split(",")]
    runs: dict[int, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in counts:
            runs[nproc] = launch(nproc, args, Path(tmp) / f"p{nproc}.json")
    base = max(r["median_s"] for r in runs[counts[0]])
    digests = {r["digest"] for records in runs.values() for r in records}
    print(f"kNN search of a [{args.items}, {args.dim}] table, k = {args.k}, 1 thread/process")
    print("| processes | slowest process s (median) | ratio to the first | same neighbours |")
    print("|---|---|---|---|")
    for nproc, records in runs.items():
        slowest = max(r["median_s"] for r in records)
        print(f"| {nproc} | {slowest:.2f} | {slowest / base:.2f} | {len(digests) == 1} |")
    if args.out is not None:
        from cm3_pyg.io import atomic_write_text

        summary = {"items": args.items, "dim": args.dim, "k": args.k, "runs": runs}
        atomic_write_text(args.out, json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
