"""Where an optimizer step's wall time goes, timed in place (no profiler).

    python -m benchmarks.step_phases --scale tiktok --data-root ../shared/data
    python -m benchmarks.step_phases --scale baby --model cm3 --steps 30

Each step of the trainer's own loop is cut into five phases, timed with a wall clock
around each (on CUDA with a synchronisation at every cut): drawing the batch's negatives,
the forward pass and loss (``model.loss_terms``), the inner problems' steps (SEA's CLUB
network; empty for the other models), ``loss.backward()``, and the optimizer step. The
medians over ``--steps`` steps (after ``--warmup`` untimed ones) are printed beside the
whole step's median.

Why not torch.profiler: on this project's 2-core VM, profiling a TikTok step reported 130
to 250 ms of operator time for a step that takes about 105 ms unprofiled, and it put most
of the excess on ``fill_`` and ``cat`` (zero-filled outputs of the CSR products), which
take under 1 ms each when timed in place. The profiler is still the tool for ranking
operators; this script says how the real step divides.

For CM3 with 1024-d or wider features, it also prints the encoders' GEMM floor per step
(:func:`benchmarks.run.encoder_flops` at the float32 GEMM rate measured just before), so
the part of the step above that floor is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.run import encoder_flops, load_scale, matmul_gflops
from cm3_pyg.models import Batch, get_model_class
from cm3_pyg.nn.precision import matmul_precision
from cm3_pyg.training import load_config
from cm3_pyg.training.inputs import build_graph_inputs, get_splits
from cm3_pyg.training.memory import retain_freed_memory
from cm3_pyg.training.sampler import epoch_batches
from cm3_pyg.training.trainer import Trainer, seed_everything

PHASES = ("negatives", "forward_and_loss", "inner_steps", "backward", "optimizer_step")


def time_phases(trainer: Trainer, steps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each of :data:`PHASES` for ``steps`` steps after ``warmup`` untimed ones.

    The steps are the trainer's own (same batches, negatives, loss and optimizer, and
    ``on_epoch_start`` before each epoch's batches); batches are drawn from as many epochs'
    orders as needed. ``"step"`` holds each whole step.
    """
    model, inputs, train = trainer.model, trainer.inputs, trainer.splits.train
    batch_size = int(trainer.config["train_batch_size"])
    device = trainer.device

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def batches() -> Any:
        epoch = 0
        while True:  # per-epoch model state as the trainer sets it (not timed)
            epoch += 1
            with matmul_precision(trainer.precision):
                model.on_epoch_start(epoch, inputs)
            yield from epoch_batches(train.size(1), batch_size, trainer.generator)

    model.train()
    times: dict[str, list[float]] = {name: [] for name in (*PHASES, "step")}
    for index, rows in enumerate(batches()):
        if index == warmup + steps:
            break
        rows = rows.to(device)
        users, pos = train[0, rows], train[1, rows]
        cuts = [clock()]
        neg = trainer.sampler.sample(users, trainer.generator)
        cuts.append(clock())
        with matmul_precision(trainer.precision):  # the trainer's operand precision
            terms = model.loss_terms(inputs, Batch(users, pos, neg))
        loss = terms.total
        cuts.append(clock())
        for problem in trainer.inner_problems:  # SEA's CLUB steps; nothing for the others
            trainer.fit_inner(problem, terms.inner_inputs[problem.name])
        cuts.append(clock())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        cuts.append(clock())
        trainer.optimizer.step()
        cuts.append(clock())
        if index >= warmup:
            for name, start, end in zip(PHASES, cuts[:-1], cuts[1:], strict=True):
                times[name].append(end - start)
            times["step"].append(cuts[-1] - cuts[0])
    return times


def run(
    scale: str,
    model_name: str = "cm3",
    steps: int = 20,
    warmup: int = 3,
    data_root: str | None = None,
    cache_dir: str | None = None,
    device: str = "cpu",
    loader: Callable[[str, str | None, str | None], Any] = load_scale,
) -> dict[str, Any]:
    """Build ``model_name`` on a suite scale with its YAML defaults and time its steps."""
    cls = get_model_class(model_name)
    data = loader(scale, data_root, cache_dir)
    config = load_config(cls.default_config(), None, {"device": device})
    seed_everything(int(config["seed"]))
    inputs = build_graph_inputs(data, config, uses_item_graph=cls.uses_item_graph)
    model = cls.from_config(config, inputs)
    trainer = Trainer(model, inputs, get_splits(data), config, progress=False)
    times = time_phases(trainer, steps, warmup)
    medians = {name: statistics.median(values) for name, values in times.items()}
    out: dict[str, Any] = {
        "scale": scale,
        "model": cls.name,
        "device": device,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "median_ms": {name: 1e3 * value for name, value in medians.items()},
        "sum_of_phase_medians_ms": 1e3 * sum(medians[name] for name in PHASES),
    }
    dims = [int(x.size(1)) for x in inputs.features]
    if cls.name == "cm3" and max(dims, default=0) >= 1024:
        rate = matmul_gflops(trainer.device)
        floor = encoder_flops(inputs.num_items, dims, int(config["embedding_size"])) / 1e9 / rate
        out["matmul_gflops"] = rate
        out["encoder_floor_ms"] = 1e3 * floor
        out["above_floor_ms"] = out["median_ms"]["step"] - out["encoder_floor_ms"]
    return out


def format_report(result: dict[str, Any]) -> str:
    """The phases as a markdown table (ms and share of the step's median)."""
    step = result["median_ms"]["step"]
    lines = [
        f"{result['model']} on {result['scale']} ({result['device']}, "
        f"{result['threads']} threads), medians over {result['steps']} steps:",
        "",
        "| phase | ms | share of step |",
        "|---|---|---|",
    ]
    for name in (*PHASES, "step"):
        ms = result["median_ms"][name]
        lines.append(f"| {name} | {ms:.2f} | {ms / step:.0%} |")
    if "encoder_floor_ms" in result:
        lines += [
            "",
            f"encoder GEMM floor {result['encoder_floor_ms']:.1f} ms per step at "
            f"{result['matmul_gflops']:.0f} GFLOP/s; the step is {result['above_floor_ms']:.1f} "
            "ms above it",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="tiktok", help="a suite scale (tiktok, baby, synthetic...)")
    p.add_argument("--model", default="cm3")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data-root", default=os.environ.get("CM3_DATA_ROOT"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    retain_freed_memory()  # as the training CLIs do
    result = run(
        args.scale,
        args.model,
        args.steps,
        args.warmup,
        args.data_root,
        args.cache_dir,
        args.device,
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
