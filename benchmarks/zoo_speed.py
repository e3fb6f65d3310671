"""Every model's seconds per training epoch against its reference implementation, one sitting.

    python -m benchmarks.zoo_speed --refs /path/to/checkouts --reference-python PY \\
        --data-root ../shared/data --scales tiktok,baby --epochs 2 --out RESULT.md

``--refs`` is a folder holding checkouts (each the folder containing ``src/``) named
``MMRec`` (github.com/enoche/MMRec: BM3, FREEDOM, LightGCN, VBPR, BPR), ``LIRDRec``
(enoche/LIRDRec), ``SEA`` (bruno686/SEA) and ``CM3`` (enoche/CM3); none of their code is
part of this repository. For each model and scale the reference runs first
(:func:`benchmarks.reference_cm3.time_reference`, its own trainer's epoch span), then ours
(:func:`ours_epochs` in a child process: the trainer's ``train_epoch``, which includes the
model's epoch-start work as the reference's span includes ``pre_epoch_processing``), both on
the same data with the same configuration: our defaults, and for each key the reference's
YAML lists as a search grid, our value of it (a reference-only grid key takes its first
value). The ratio is ours over the reference's median epoch.

The reference interpreter (``--reference-python``) needs pandas, scipy, pyyaml and, for
LIRDRec, torch-dct, beside the same torch: ``pip install torch==2.13.0 pandas scipy pyyaml
&& pip install --no-deps torch-dct``. Both sides use torch's default thread count unless
``--threads`` is given.

Our side runs with huge-page-aligned large CPU tensors (importing ``cm3_pyg`` sets
``THP_MEM_ALLOC_ENABLE=1``, see :mod:`cm3_pyg._hugepages`); the reference runs as shipped.
``--reference-huge-pages both`` times the reference a second time with the same variable
set, so each row also carries the ratio against a reference given the same allocator
setting (``on``: only that run).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

#: our model -> (checkout folder under --refs, the reference's model class)
REFERENCES: dict[str, tuple[str, str]] = {
    "cm3": ("CM3", "CM3"),
    "lirdrec": ("LIRDRec", "LIRDRec"),
    "sea": ("SEA", "SEA"),
    "bm3": ("MMRec", "BM3"),
    "freedom": ("MMRec", "FREEDOM"),
    "lightgcn": ("MMRec", "LightGCN"),
    "vbpr": ("MMRec", "VBPR"),
    "bprmf": ("MMRec", "BPR"),
}
#: ``--reference-huge-pages`` choices
HUGE_PAGE_MODES = ("off", "on", "both")
#: training keys that must agree on both sides
SHARED_KEYS = ("learning_rate", "train_batch_size", "embedding_size", "weight_decay", "seed")


def our_config(model: str) -> dict[str, Any]:
    """Our model's full default configuration (MMRec key names)."""
    from cm3_pyg.models import get_model_class
    from cm3_pyg.training import load_config

    return load_config(get_model_class(model).default_config())


def reference_config(model: str, checkout: Path) -> dict[str, Any]:
    """The reference's run configuration: every grid key of its model YAML at our value of
    it (or the grid's first value where we have no such key), and the shared training keys
    at ours."""
    ours = our_config(model)
    _, cls = REFERENCES[model]
    folder = checkout / "src" / "configs" / "model"
    matches = [f for f in folder.glob("*.yaml") if f.stem.lower() == cls.lower()]
    if not matches:
        raise FileNotFoundError(f"{folder}: no YAML of model {cls}")
    own = yaml.safe_load(matches[0].read_text(encoding="utf-8")) or {}
    config: dict[str, Any] = {}
    for key in own.get("hyper_parameters", []):
        value = own.get(key)
        if isinstance(value, list):
            config[key] = ours[key] if key in ours else value[0]
    for key in SHARED_KEYS:
        config[key] = ours[key]
    if cls == "CM3":
        from benchmarks.reference_cm3 import REFERENCE_CONFIG

        config = {**REFERENCE_CONFIG, **config}
    config["hyper_parameters"] = ["seed"]
    return config


def reference_extras(model: str) -> dict[str, Any]:
    """SEA's reference takes its options as a command-line namespace and its trainer a CLUB
    network (``utils/quick_start.py``): both at our values (``reg_weight`` 0, the default of
    its ``main.py``; our SEA has no such term)."""
    if model != "sea":
        return {}
    ours = our_config(model)
    return {
        "model_args": {
            "alpha_contrast": ours["alpha_contrast"],
            "temp": ours["temp"],
            "hidden_dim": ours["proj_hidden_dim"],
            "out_dim": ours["proj_out_dim"],
            "reg_weight": 0.0,
            "ureg": ours["ureg"],
        },
        "club": {
            "x_dim": ours["club_dim"],
            "y_dim": ours["club_dim"],
            "hidden_size": ours["club_hidden_size"],
        },
    }


def ours_epochs(
    model: str, scale: str, epochs: int, data_root: str | None, cache_dir: str | None
) -> dict[str, Any]:
    """Train our ``model`` at ``scale`` for ``epochs`` epochs; seconds of each epoch."""
    import torch

    from benchmarks.run import load_scale
    from cm3_pyg.models import get_model_class
    from cm3_pyg.training.inputs import build_graph_inputs, get_splits
    from cm3_pyg.training.memory import retain_freed_memory
    from cm3_pyg.training.trainer import Trainer, seed_everything

    retain_freed_memory()  # what the training CLIs do
    cls = get_model_class(model)
    config = our_config(model)
    data = load_scale(scale, data_root, cache_dir)
    seed_everything(int(config["seed"]))
    inputs = build_graph_inputs(data, config, uses_item_graph=cls.uses_item_graph)
    splits = get_splits(data)
    trainer = Trainer(cls.from_config(config, inputs), inputs, splits, config, progress=False)
    seconds, losses = [], []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        losses.append(trainer.train_epoch(epoch))
        seconds.append(time.perf_counter() - start)
    return {
        "epoch_seconds": seconds,
        "median_epoch_seconds": statistics.median(seconds),
        "epoch_losses": losses,
        "threads": torch.get_num_threads(),
        "train_rows": int(splits.train.size(1)),
    }


def _ours_in_child(
    model: str, scale: str, epochs: int, data_root: str | None, cache_dir: str | None, env: dict
) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.zoo_speed", "--ours", model, "--scales", scale]
    command += ["--epochs", str(epochs)]
    if data_root:
        command += ["--data-root", data_root]
    if cache_dir:
        command += ["--cache-dir", cache_dir]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"our {model} at {scale} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def sitting(
    models: Sequence[str],
    scales: Sequence[str],
    refs: Path,
    epochs: int,
    data_root: str | None,
    cache_dir: str | None,
    reference_python: str | None,
    threads: int | None,
    progress_file: Path | None = None,
    reference_huge_pages: str = "off",
) -> list[dict[str, Any]]:
    """Reference then ours, for every (scale, model), in that order. A side that fails is
    recorded in its row (``error``) and the sitting goes on; ``progress_file`` is rewritten
    with the rows so far after each one. ``reference_huge_pages``: ``"off"`` (the
    reference as shipped), ``"on"`` (with ``THP_MEM_ALLOC_ENABLE=1``) or ``"both"`` (as
    shipped, then with it; the second run fills the ``reference_thp_*`` fields)."""
    if reference_huge_pages not in HUGE_PAGE_MODES:
        raise ValueError(
            f"reference_huge_pages must be one of {HUGE_PAGE_MODES}, got {reference_huge_pages!r}"
        )
    from benchmarks.reference_cm3 import time_reference

    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    rows = []
    for scale in scales:
        for model in models:
            folder, cls = REFERENCES[model]
            checkout = refs / folder
            config = reference_config(model, checkout)
            print(f"{scale} {model}: reference {cls} ...", flush=True)
            run_reference = functools.partial(
                time_reference,
                str(checkout),
                scale,
                epochs=epochs,
                threads=threads,
                data_root=data_root or os.environ.get("CM3_DATA_ROOT", "../shared/data"),
                python=reference_python,
                evaluate=False,
                model=cls,
                config=config,
                **reference_extras(model),
            )
            try:
                reference = run_reference(huge_pages=reference_huge_pages == "on")
                with_thp = None
                if reference_huge_pages == "both":
                    print(f"{scale} {model}: reference {cls} with huge pages ...", flush=True)
                    with_thp = run_reference(huge_pages=True)
                print(f"{scale} {model}: ours ...", flush=True)
                ours = _ours_in_child(model, scale, epochs, data_root, cache_dir, env)
            except (RuntimeError, FileNotFoundError) as exc:
                print(f"{scale} {model}: failed: {str(exc)[-500:]}", flush=True)
                rows.append({"scale": scale, "model": model, "error": str(exc)[-2000:]})
                continue
            row = {
                "scale": scale,
                "model": model,
                "reference_model": f"{folder}/{cls}",
                "reference_config": config,
                "reference_epoch_seconds": reference["epoch_seconds"],
                "reference_median": reference["median_epoch_seconds"],
                "reference_batches": reference["num_batches"],
                "ours_epoch_seconds": ours["epoch_seconds"],
                "ours_median": ours["median_epoch_seconds"],
                "ratio": ours["median_epoch_seconds"] / reference["median_epoch_seconds"],
                "reference_huge_pages": reference_huge_pages == "on",
            }
            if with_thp is not None:
                row["reference_thp_epoch_seconds"] = with_thp["epoch_seconds"]
                row["reference_thp_median"] = with_thp["median_epoch_seconds"]
                row["ratio_thp"] = ours["median_epoch_seconds"] / with_thp["median_epoch_seconds"]
            print(
                f"{scale} {model}: reference {row['reference_median']:.2f} s, ours "
                f"{row['ours_median']:.2f} s, ratio {row['ratio']:.3f}",
                flush=True,
            )
            rows.append(row)
            if progress_file is not None:
                progress_file.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a table; with ``reference_thp_*`` fields in any row, two more columns
    (the reference with huge pages and the ratio against it)."""
    thp = any("reference_thp_median" in r for r in rows)
    head = "| scale | model | reference | reference s/epoch | ours s/epoch | ratio |"
    rule = "|---|---|---|---|---|---|"
    if thp:
        head += " reference s/epoch, huge pages | ratio to it |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        if "error" in r:
            reason = r["error"].strip().splitlines()[-1][:120] if r["error"].strip() else "?"
            lines.append(f"| {r['scale']} | {r['model']} | failed: {reason} | | | |")
            continue
        ref = ", ".join(f"{x:.2f}" for x in r["reference_epoch_seconds"])
        our = ", ".join(f"{x:.2f}" for x in r["ours_epoch_seconds"])
        line = (
            f"| {r['scale']} | {r['model']} | {r['reference_model']} | {r['reference_median']:.2f}"
            f" ({ref}) | {r['ours_median']:.2f} ({our}) | {r['ratio']:.3f} |"
        )
        if thp:
            if "reference_thp_median" in r:
                t = ", ".join(f"{x:.2f}" for x in r["reference_thp_epoch_seconds"])
                line += f" {r['reference_thp_median']:.2f} ({t}) | {r['ratio_thp']:.3f} |"
            else:
                line += " | |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(REFERENCES))
    parser.add_argument("--scales", default="tiktok,baby")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--refs", help="folder of the reference checkouts (MMRec, LIRDRec, ...)")
    parser.add_argument("--data-root", default=os.environ.get("CM3_DATA_ROOT"))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--reference-python", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--reference-huge-pages",
        choices=HUGE_PAGE_MODES,
        default="off",
        help="the reference as shipped (off), with THP_MEM_ALLOC_ENABLE=1 (on), or both",
    )
    parser.add_argument("--out", help="write the table (Markdown) and OUT.json here")
    parser.add_argument("--ours", help=argparse.SUPPRESS)  # child mode: one of our models
    args = parser.parse_args(argv)
    scales = [s for s in args.scales.split(",") if s]
    if args.ours:
        result = ours_epochs(args.ours, scales[0], args.epochs, args.data_root, args.cache_dir)
        print(json.dumps(result), flush=True)
        return
    if not args.refs:
        raise SystemExit("--refs: the folder of the reference checkouts is needed")
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in REFERENCES]
    if unknown:
        raise SystemExit(f"no reference known for {unknown}; known: {sorted(REFERENCES)}")
    rows = sitting(
        models,
        scales,
        Path(args.refs),
        args.epochs,
        args.data_root,
        args.cache_dir,
        args.reference_python,
        args.threads,
        Path(args.out).with_suffix(".json") if args.out else None,
        args.reference_huge_pages,
    )
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
