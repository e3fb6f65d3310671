"""This revision against an older one in ONE process, their training epochs interleaved.

    python -m benchmarks.interleaved --baseline-rev b98b043 --scale tiktok \
        --data-root ../shared/data
    python -m benchmarks.interleaved --baseline-rev b98b043 --scale baby --rounds 3 \
        --data-root ../shared/data --cache-dir /tmp/cm3cache

Separate processes on this shared 2-core VM drift by 10-30% between minutes (fast and slow
phases), which swamps a few-percent difference. Here the older ``cm3_pyg`` is extracted
from git, renamed to ``cm3_pyg_baseline`` (imports rewritten) and imported beside the
current one; both build the same model on the same data with the same config, and their
trainers' ``train_epoch`` alternate, A B B A per round, so that a slow phase hits both
sides alike. Prints each side's epoch seconds, the medians and the ratio baseline / this
revision (above 1: this revision is faster). The side built second ran about 2% slower in
a baseline-against-baseline control, so run both ``--order`` s and average the ratios.
"""

from __future__ import annotations

import argparse
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from cm3_pyg.training.memory import retain_freed_memory

REPO = Path(__file__).resolve().parents[1]
BASELINE_NAME = "cm3_pyg_baseline"


def extract_baseline(rev: str, folder: Path) -> None:
    """``cm3_pyg`` as of ``rev`` under ``folder/cm3_pyg_baseline``, imports renamed."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "cm3_pyg"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "cm3_pyg").rename(folder / BASELINE_NAME)
    pattern = re.compile(r"\bcm3_pyg\b(?=[.\s]|$)")
    for path in (folder / BASELINE_NAME).rglob("*.py"):
        path.write_text(pattern.sub(BASELINE_NAME, path.read_text()))


def build_trainer(package: str, data: Any) -> Any:
    """A trainer of CM3 (default config) on ``data`` built with ``package``."""
    models = importlib.import_module(f"{package}.models")
    training = importlib.import_module(f"{package}.training")
    trainer_mod = importlib.import_module(f"{package}.training.trainer")
    cls = models.get_model_class("cm3")
    config = training.load_config(cls.default_config(), None, {"device": "cpu"})
    trainer_mod.seed_everything(int(config["seed"]))
    inputs = training.build_graph_inputs(data, config, uses_item_graph=cls.uses_item_graph)
    model = cls.from_config(config, inputs)
    return trainer_mod.Trainer(model, inputs, training.get_splits(data), config, progress=False)


def load_scale(scale: str, data_root: str | None, cache_dir: str | None) -> Any:
    """The suite's data of ``scale``, loaded once with this revision (a plain HeteroData
    that both sides read)."""
    if scale == "synthetic":
        from cm3_pyg.data import make_synthetic

        return make_synthetic()
    from benchmarks.run import load_scale as suite_scale

    return suite_scale(scale, data_root, cache_dir)


def timed_epoch(trainer: Any, epoch: int) -> float:
    start = time.perf_counter()
    trainer.train_epoch(epoch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--scale", default="tiktok", choices=["synthetic", "tiktok", "baby"])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--rounds", type=int, default=4, help="A B B A rounds (4 epochs each)")
    parser.add_argument(
        "--order",
        choices=["baseline-first", "this-first"],
        default="baseline-first",
        help="which side is built (and warmed up) first; run both, the side built second "
        "measured about 2%% slower in a baseline-against-baseline control",
    )
    args = parser.parse_args()
    retain_freed_memory()  # as the training CLIs (both sides share the allocator)
    with tempfile.TemporaryDirectory() as tmp:
        extract_baseline(args.baseline_rev, Path(tmp))
        sys.path.insert(0, tmp)
        data = load_scale(args.scale, args.data_root, args.cache_dir)
        builds = [("baseline", BASELINE_NAME), ("this revision", "cm3_pyg")]
        if args.order == "this-first":
            builds.reverse()
        sides: dict[str, Any] = {label: build_trainer(package, data) for label, package in builds}
        times: dict[str, list[float]] = {label: [] for label in sides}
        epoch = {label: 0 for label in sides}
        for label in sides:  # one untimed warm-up epoch each
            epoch[label] += 1
            timed_epoch(sides[label], epoch[label])
        order = ["baseline", "this revision", "this revision", "baseline"]
        for _ in range(args.rounds):
            for label in order:
                epoch[label] += 1
                times[label].append(timed_epoch(sides[label], epoch[label]))
        medians = {label: statistics.median(t) for label, t in times.items()}
        for label, t in times.items():
            print(
                f"{label}: " + " ".join(f"{x:.2f}" for x in t) + f"  median {medians[label]:.3f} s"
            )
        ratio = medians["baseline"] / medians["this revision"]
        print(
            f"{args.scale} ({args.order}): baseline {args.baseline_rev} / this revision "
            f"= {ratio:.3f}"
        )


if __name__ == "__main__":
    main()
