"""Per-process memory of multi-process training at Elec scale (issue 19).

    python -m benchmarks.distributed_memory --build /scratch/elec-inputs.pt   # once
    python -m benchmarks.distributed_memory --inputs /scratch/elec-inputs.pt \\
        --nproc 1,2,4 --steps 2 --out benchmarks/results/distributed-memory-elec.json

``--build`` makes :func:`benchmarks.scales.elec_scale`'s CM3 graph inputs (the kNN graphs take
most of its time) and saves them with the splits and CM3's default configuration. Each
process count then runs the worker (``torchrun --nproc_per_node P``; one plain process for
``P = 1``): every process reads the whole file (or maps it, ``--mmap``), builds CM3 and
its trainer (which keeps only its block of the feature tables' rows,
:class:`~cm3_pyg.nn.parallel.RowShard`), frees the rest, resets its
peak resident set (``/proc/self/clear_refs``), trains ``--steps`` steps and reports its
peak, the bytes of the divided tensors (feature rows, graph row blocks, optimiser state) and
of the whole ones (parameters and gradients) it holds, and the step time.
``--evaluate`` also measures one validation evaluation (each process ranks its block of the
users) after another reset. ``--mmap`` maps the inputs file instead of reading it (as
:class:`~cm3_pyg.data.MMRecDataset` maps its cache): the tables are then page cache, one copy
shared by the processes of a machine, and only the rows a process reads become resident in
it. The resident set then counts those shared file pages too, so every phase also reports
its private memory (``RssAnon``, sampled every few milliseconds for the peaks) and the file
pages (``RssFile``). ``--view`` hands the trainer views of the tables' blocks instead of
letting it copy them, as :func:`~cm3_pyg.training.run_experiment` does (the run keeps the
dataset, so the copy would only add the block). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

MIB = 2**20


def build(path: Path, scale: str = "elec") -> None:
    """Save a scale's CM3 graph inputs, splits and configuration to ``path`` (``"elec"``:
    :func:`benchmarks.scales.elec_scale`; ``"synthetic"``: the embedded default data)."""
    import torch

    from benchmarks.run import load_scale
    from cm3_pyg.models import CM3
    from cm3_pyg.training import load_config
    from cm3_pyg.training.inputs import build_graph_inputs, get_splits

    start = time.perf_counter()
    data = load_scale(scale, None, None)
    config = load_config(CM3.default_config(), None, {"sparse_backend": "csr"})
    inputs = build_graph_inputs(data, config, uses_item_graph=True)
    splits = get_splits(data)
    built = time.perf_counter() - start
    # our own file, read back by the worker only (SparseAdjacency pickles its entries)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"inputs": inputs, "splits": splits, "config": config}, tmp)
    os.replace(tmp, path)
    print(f"built in {built:.0f} s: {path} ({path.stat().st_size / MIB:.0f} MiB)")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class _PrivatePeak:
    """The largest ``RssAnon`` (private memory) seen while the block runs, sampled by a
    thread (torch's kernels release the GIL); ``VmHWM`` cannot tell private pages from the
    shared pages of a mapped file."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _PrivatePeak:
        self.peak_kib = _status_kib("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))

    @property
    def mib(self) -> float:
        return self.peak_kib / 1024


def _reset_peak() -> None:
    # "5" resets VmHWM to the current resident set (Linux >= 4.0)
    Path("/proc/self/clear_refs").write_text("5")


def _nbytes(tensors: Sequence[Any]) -> int:
    return sum(int(t.numel()) * t.element_size() for t in tensors)


def worker(
    inputs_path: Path, steps: int, evaluate: bool, out_json: Path, mmap: bool, view: bool
) -> None:
    import torch
    import torch.distributed as dist

    from cm3_pyg.models import CM3
    from cm3_pyg.nn.parallel import RowShard
    from cm3_pyg.training.distributed import world_from_env
    from cm3_pyg.training.trainer import Trainer, seed_everything

    with _PrivatePeak() as setup:
        # read, or mapped: a mapping lives as long as any tensor loaded from it (the graphs),
        # so the rows a process reads stay resident as shared file pages
        saved = torch.load(inputs_path, weights_only=False, mmap=mmap)
        inputs, splits, config = saved["inputs"], saved["splits"], saved["config"]
        del saved
        world = world_from_env("cpu")
        seed_everything(int(config["seed"]))
        model = CM3.from_config(config, inputs)
        if view and world is not None:  # as run_experiment
            inputs = replace(
                inputs, features=RowShard.of_each(inputs.features, world.split, copy=False)
            )
        trainer = Trainer(model, inputs, splits, config, progress=False, world=world)
        del inputs, model  # the trainer holds what training reads (its feature rows only)
        gc.collect()
    record: dict[str, Any] = {
        "rank": 0 if world is None else world.rank,
        "world_size": 1 if world is None else world.world_size,
        "mmap": mmap,
        "view": view,
        "setup_rss_mib": _status_kib("VmRSS") / 1024,
        "setup_peak_mib": _status_kib("VmHWM") / 1024,
        "setup_private_mib": _status_kib("RssAnon") / 1024,
        "setup_file_mib": _status_kib("RssFile") / 1024,
        "setup_private_peak_mib": setup.mib,
    }
    features = trainer.inputs.features
    feature_blocks = [f.local if isinstance(f, RowShard) else f for f in features]
    record["feature_rows"] = [int(t.size(0)) for t in feature_blocks]
    record["feature_mib"] = _nbytes(feature_blocks) / MIB
    _reset_peak()
    with _PrivatePeak() as training:
        start = time.perf_counter()
        trainer.train_epoch(1, max_batches=steps)
        record["step_s"] = (time.perf_counter() - start) / steps
    record["train_peak_mib"] = _status_kib("VmHWM") / 1024
    record["train_private_peak_mib"] = training.mib
    record["train_file_mib"] = _status_kib("RssFile") / 1024
    ui_adj = trainer.inputs.ui_adj
    blocks = list(ui_adj._row_blocks.values())
    if trainer.inputs.item_adj is not None:
        blocks += list(trainer.inputs.item_adj._row_blocks.values())
    entries = [t for block in blocks for t in (block.row, block.col, block.value)]
    record["adjacency_block_mib"] = _nbytes(entries) / MIB
    params = list(trainer.model.parameters())
    # parameters and their gradients: whole on every process
    record["parameter_mib"] = 2 * _nbytes(params) / MIB
    # the optimiser's per-element state (Adam's moments): divided among the processes
    optimizer = trainer.optimizer
    inner = getattr(optimizer, "inner", optimizer)
    state = [] if inner is None else list(inner.state.values())
    moments = [v for entry in state for k, v in entry.items() if k != "step"]
    record["optimizer_state_mib"] = _nbytes(moments) / MIB
    if evaluate:
        gc.collect()
        _reset_peak()
        with _PrivatePeak() as evaluation:
            start = time.perf_counter()
            trainer.evaluate("valid", trainer.embed())
            record["eval_s"] = time.perf_counter() - start
        record["eval_peak_mib"] = _status_kib("VmHWM") / 1024
        record["eval_private_peak_mib"] = evaluation.mib
    every = [record]
    if world is not None:
        every = [None] * world.world_size
        dist.all_gather_object(every, record)
    if record["rank"] == 0:
        out_json.write_text(json.dumps(every), encoding="utf-8")


def launch(
    nproc: int,
    inputs_path: Path,
    steps: int,
    evaluate: bool,
    out: Path,
    mmap: bool = False,
    view: bool = False,
) -> list[Any]:
    """One worker run on ``nproc`` processes; every process's record."""
    from benchmarks.distributed_parity import run_module

    args = ["--worker", str(out), "--inputs", str(inputs_path), "--steps", str(steps)]
    args += ["--evaluate"] if evaluate else []
    args += ["--mmap"] if mmap else []
    args += ["--view"] if view else []
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return run_module(nproc, "benchmarks.distributed_memory", args, out, env=threads)


def format_table(runs: dict[int, list[dict[str, Any]]]) -> str:
    """Markdown: per process count, the largest per-process figures (rank 0's rows)."""
    lines = [
        "| processes | feature rows per process | feature MiB per process | adjacency blocks "
        "MiB | parameters + gradients MiB | optimizer state MiB | setup RSS MiB | setup peak "
        "private MiB | training peak MiB (private) | eval peak MiB (private) | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for nproc, records in sorted(runs.items()):

        def worst(key: str, digits: int = 0, records: list[dict[str, Any]] = records) -> str:
            values = [r[key] for r in records if key in r]
            return f"{max(values):,.{digits}f}" if values else "-"

        rows = " / ".join(", ".join(f"{n:,}" for n in r["feature_rows"]) for r in records[:2]) + (
            " / ..." if len(records) > 2 else ""
        )
        lines.append(
            f"| {nproc} | {rows} | {worst('feature_mib', 1)} | {worst('adjacency_block_mib')} | "
            f"{worst('parameter_mib')} | {worst('optimizer_state_mib', 1)} | "
            f"{worst('setup_rss_mib')} | {worst('setup_private_peak_mib')} | "
            f"{worst('train_peak_mib')} ({worst('train_private_peak_mib')}) | "
            f"{worst('eval_peak_mib')} ({worst('eval_private_peak_mib')}) | "
            f"{max(r['step_s'] for r in records):.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, help="make the Elec inputs file and stop")
    parser.add_argument("--scale", choices=("elec", "synthetic"), default="elec")
    parser.add_argument("--inputs", type=Path, help="the file --build wrote")
    parser.add_argument("--nproc", default="1,2,4", help="comma-separated process counts")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--evaluate", action="store_true", help="also one validation pass")
    parser.add_argument("--mmap", action="store_true", help="map the inputs file, not read it")
    parser.add_argument("--view", action="store_true", help="blocks as views, as run_experiment")
    parser.add_argument("--out", type=Path, help="write every process's records (JSON)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build is not None:
        build(args.build, args.scale)
        return
    if args.inputs is None or not args.inputs.is_file():
        parser.error(f"--inputs must name the file --build wrote, got {args.inputs}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.worker is not None:
        worker(args.inputs, args.steps, args.evaluate, args.worker, args.mmap, args.view)
        return
    runs: dict[int, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (int(p) for p in args.nproc.split(",")):
            runs[nproc] = launch(
                nproc,
                args.inputs,
                args.steps,
                args.evaluate,
                Path(tmp) / f"p{nproc}.json",
                args.mmap,
                args.view,
            )
            print(format_table(runs), flush=True)
    if args.out is not None:
        from cm3_pyg.io import atomic_write_text

        atomic_write_text(args.out, json.dumps({str(p): r for p, r in runs.items()}, indent=1))


if __name__ == "__main__":
    main()
