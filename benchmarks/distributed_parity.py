"""Multi-process training against one process: per-step losses and final metrics.

    python -m benchmarks.distributed_parity                      # 2 processes, every model
    python -m benchmarks.distributed_parity --nproc 2,4 --models cm3,lightgcn --epochs 3

For each process count it runs ``torchrun --nproc_per_node P`` of this module in worker
mode, and once the worker in a single process, on the same synthetic data (the embedded
default data of ``cm3-pyg train``, or ``--users/--items`` for a smaller set) and the same
configuration, and compares every training step's loss (relative difference) and the final
validation/test metrics (absolute difference). ``--out`` writes the table as Markdown.

The worker (``--worker OUT.json``) trains each model with :func:`run_experiment` into its own
folder, records every batch's loss through the trainer's ``fault_injector`` hook (which
returns the loss unchanged), and rank 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

#: Every registered model, in the order of the TikTok table.
ALL_MODELS = ("cm3", "lirdrec", "sea", "bm3", "freedom", "lightgcn", "vbpr", "bprmf")


def worker(
    out_json: Path,
    models: Sequence[str],
    epochs: int,
    users: int,
    items: int,
    folder: Path,
    resume: bool = False,
) -> None:
    import torch

    from cm3_pyg.data import make_synthetic
    from cm3_pyg.models import get_model_class
    from cm3_pyg.nn.parallel import count_traffic
    from cm3_pyg.training import load_config
    from cm3_pyg.training.experiment import run_experiment

    data = make_synthetic(num_users=users, num_items=items, seed=0)
    record: dict[str, Any] = {}
    for name in models:
        config = load_config(
            get_model_class(name).default_config(),
            overrides={"epochs": epochs, "seed": 999, "sparse_backend": "csr"},
        )
        losses: list[float] = []

        def keep(epoch: int, batch: int, loss: torch.Tensor, losses: list = losses) -> torch.Tensor:
            losses.append(float(loss.detach()))
            return loss

        with count_traffic() as traffic:
            metrics = run_experiment(
                data,
                name,
                config,
                out_dir=folder / name,
                progress=False,
                overwrite=not resume,
                resume=resume,
                fault_injector=keep,
            )
        record[name] = {
            "losses": losses,
            "valid": metrics["valid"],
            "test": metrics["test"],
            "world_size": metrics["world_size"],
            "epoch_seconds": metrics["epoch_seconds"],
            "epochs_run": metrics["epochs_run"],
            "traffic": asdict(traffic),
            "feature_rows_held": _feature_rows_held(data, name, config),
        }
    if int(os.environ.get("RANK", "0")) == 0:
        out_json.write_text(json.dumps(record), encoding="utf-8")


def _feature_rows_held(data: Any, name: str, config: dict[str, Any]) -> list[list[int]]:
    """Per process, the rows of each feature table a trainer of ``name`` keeps: a block of
    them for a model with ``row_local_features`` on several processes, else all."""
    import torch.distributed as dist

    from cm3_pyg.models import get_model_class
    from cm3_pyg.nn.parallel import RowShard
    from cm3_pyg.training.distributed import world_from_env
    from cm3_pyg.training.inputs import build_graph_inputs, get_splits
    from cm3_pyg.training.trainer import Trainer

    cls = get_model_class(name)
    inputs = build_graph_inputs(data, config, uses_item_graph=cls.uses_item_graph)
    world = world_from_env(str(config["device"]))
    trainer = Trainer(
        cls.from_config(config, inputs),
        inputs,
        get_splits(data),
        config,
        progress=False,
        world=world,
    )
    held = [
        int(f.local.size(0)) if isinstance(f, RowShard) else int(f.size(0))
        for f in trainer.inputs.features
    ]
    if world is None:
        return [held]
    every: list[Any] = [None] * world.world_size
    dist.all_gather_object(every, held)
    return every


def launch(
    nproc: int,
    models: Sequence[str],
    epochs: int,
    users: int,
    items: int,
    work: Path,
    folder: Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """One worker run with ``nproc`` processes (``1``: a plain process, no torchrun), its
    runs in ``folder`` (default: one per process count under ``work``); ``resume``
    continues the runs there."""
    out = work / f"p{nproc}{'-resumed' if resume else ''}.json"
    folder = folder if folder is not None else work / f"runs-p{nproc}"
    args = [
        "--worker",
        str(out),
        "--models",
        ",".join(models),
        "--epochs",
        str(epochs),
        "--users",
        str(users),
        "--items",
        str(items),
        "--folder",
        str(folder),
        *(["--resume"] if resume else []),
    ]
    return run_module(nproc, "benchmarks.distributed_parity", args, out)


def run_module(
    nproc: int,
    module: str,
    args: Sequence[str],
    out: Path,
    env: dict[str, str] | None = None,
) -> Any:
    """Run ``python -m module *args`` on ``nproc`` processes (``torchrun --nproc_per_node``
    on a free port; ``1``: one plain process, no torchrun) from the repository root, with
    this process's environment less any torchrun variables, plus ``env``; the JSON the
    worker wrote to ``out``."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(env or {})
    if nproc == 1:
        command = [sys.executable, "-m", module, *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", module, *args,
        ]  # fmt: skip
    subprocess.run(command, check=True, env=environ, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.read_text(encoding="utf-8"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def compare(single: dict[str, Any], multi: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per model: the largest relative per-step loss difference and the largest absolute
    difference of any final metric."""
    out = {}
    for name, one in single.items():
        other = multi[name]
        if len(one["losses"]) != len(other["losses"]):
            raise AssertionError(
                f"{name}: {len(one['losses'])} steps in one process, {len(other['losses'])}"
            )
        rel = max(
            abs(a - b) / max(abs(a), 1e-12)
            for a, b in zip(one["losses"], other["losses"], strict=True)
        )
        metric = max(
            abs(one[split][key] - other[split][key])
            for split in ("valid", "test")
            for key in one[split]
        )
        out[name] = {
            "steps": len(one["losses"]),
            "loss_rel": rel,
            "metric_abs": metric,
            "world_size": other["world_size"],
        }
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ALL_MODELS))
    parser.add_argument("--nproc", default="2", help="comma-separated process counts")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--out", help="write the table here (Markdown)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if args.worker:
        worker(
            Path(args.worker),
            models,
            args.epochs,
            args.users,
            args.items,
            Path(args.folder),
            args.resume,
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        single = launch(1, models, args.epochs, args.users, args.items, work)
        lines = [
            "| model | processes | steps | max relative step-loss difference | "
            "max final-metric difference |",
            "|---|---|---|---|---|",
        ]
        for nproc in (int(p) for p in args.nproc.split(",")):
            multi = launch(nproc, models, args.epochs, args.users, args.items, work)
            for name, row in compare(single, multi).items():
                lines.append(
                    f"| {name} | {row['world_size']} | {row['steps']} | {row['loss_rel']:.2e} | "
                    f"{row['metric_abs']:.2e} |"
                )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
