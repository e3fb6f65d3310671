"""The benchmark suite's own arithmetic and report (the timings themselves are not tested)."""

from __future__ import annotations

import math

import torch
from torch.nn import LeakyReLU, Linear, Sequential
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.run import (
    bandwidth_section,
    child_options,
    encoder_flops,
    kernels_section,
    merge_results,
    product_bytes,
    to_markdown,
)


def test_encoder_flops_match_torch_flop_counter():
    # CM3's encoders and projections on frozen features, forward + backward, counted by
    # torch's own FLOP counter.
    num_items, dims, d = 50, [12, 5], 4
    torch.manual_seed(0)
    encoders = [
        Sequential(Linear(f, 4 * d), LeakyReLU(), Linear(4 * d, d, bias=False)) for f in dims
    ]
    projections = [Linear(f, d) for f in dims]
    features = [torch.randn(num_items, f) for f in dims]
    with FlopCounterMode(display=False) as counter:
        out = sum(
            (enc(x).sum() + proj(x).sum())
            for enc, proj, x in zip(encoders, projections, features, strict=True)
        )
        out.backward()
    assert encoder_flops(num_items, dims, d) == counter.get_total_flops()


def test_kernel_rows_and_markdown():
    index = torch.tensor([[0, 1, 1, 2, 3], [1, 0, 2, 1, 3]])
    weight = torch.ones(5)
    rows = kernels_section({"tiny": (index, weight, 4)}, "cpu")
    assert [r["width"] for r in rows] == [64, 192]
    for row in rows:
        assert row["ratio_vs_torch_sparse_mm"]["torch.sparse.mm (CSR, autograd)"] == 1.0
        assert "cm3_pyg csr (prebuilt transpose)" in row["ms"]
    text = to_markdown(
        {
            "suite": "quick",
            "device": "cpu",
            "date": "today",
            "total_seconds": 1.0,
            "machine": {"cpus": 2, "ram_gib": 1, "torch": "x", "threads": 1, "torch_sparse": False},
            "kernels": rows,
        }
    )
    assert "| tiny | 5 | 64 |" in text


def test_product_bytes_count_a_hand_worked_matrix():
    # A [3, 4] CSR matrix with 5 entries, int64 indices, x of width 2: row pointers 4 * 8,
    # entries 5 * (8 + 4), output 3 * 2 * 4; rows gathered per entry 5 * 2 * 4, or x once
    # 4 * 2 * 4.
    moved = product_bytes(3, 4, 5, 2, 8)
    assert moved == {"gathered": 32 + 60 + 40 + 24, "compulsory": 32 + 60 + 32 + 24}


def test_bandwidth_rows_and_markdown():
    index = torch.tensor([[0, 1, 1, 2, 3], [1, 0, 2, 1, 3]])
    weight = torch.rand(5)
    band = bandwidth_section({"toy": (index, weight, 4)}, "cpu", width=8, repeats=2)
    assert band["copy_gbps"] > 0
    (row,) = band["rows"]
    assert row["nnz"] == 5 and row["width"] == 8 and row["ms"] > 0
    # both byte counts over the same time: their ratio is the ratio of the counts
    moved = product_bytes(4, 4, 5, 8, 8)
    ratio = row["gbps"]["gathered"] / row["gbps"]["compulsory"]
    assert math.isclose(ratio, moved["gathered"] / moved["compulsory"], rel_tol=1e-9)
    assert math.isclose(
        row["of_copy"]["gathered"] / row["gbps"]["gathered"], 1 / band["copy_gbps"], rel_tol=1e-9
    )
    text = to_markdown(
        {
            "suite": "quick",
            "device": "cpu",
            "date": "today",
            "machine": {
                "python": "3",
                "torch": "2",
                "threads": 1,
                "torch_sparse": False,
                "cpus": 2,
                "ram_gib": 1,
            },
            "total_seconds": 1.0,
            "bandwidth": band,
        }
    )
    assert "## Propagation bandwidth" in text and "| toy | 5 | 8 |" in text


def test_sea_club_benchmark_sides_follow_the_same_trajectory():
    from benchmarks.sea_club import run

    out = run(rows=40, dim=4, pairs=2, steps=4, repeats=2)
    # both sides start from the same weights and take the same Adam steps on the same loss
    assert math.isclose(out["ours_final_nll"], out["plain_final_nll"], rel_tol=1e-5)
    assert out["ours_s"] > 0 and out["plain_s"] > 0
    assert math.isclose(out["ratio"], out["ours_s"] / out["plain_s"])


def test_step_phases_time_the_trainers_own_steps():
    from benchmarks.step_phases import PHASES, format_report, run, time_phases
    from cm3_pyg.data import make_synthetic
    from cm3_pyg.models import get_model_class
    from cm3_pyg.training import build_graph_inputs, load_config, seed_everything
    from cm3_pyg.training.inputs import get_splits
    from cm3_pyg.training.trainer import Trainer

    data = make_synthetic(num_users=120, num_items=80, seed=3)
    cls = get_model_class("cm3")
    config = load_config(
        cls.default_config(), overrides={"embedding_size": 8, "train_batch_size": 256}
    )

    def trainer() -> Trainer:
        seed_everything(0)
        inputs = build_graph_inputs(data, config, uses_item_graph=True)
        return Trainer(
            cls.from_config(config, inputs), inputs, get_splits(data), config, progress=False
        )

    timed, plain = trainer(), trainer()
    batches = -(-int(get_splits(data).train.size(1)) // 256)
    assert batches >= 3
    seed_everything(1)  # the fusion draws its t from the global generator
    times = time_phases(timed, steps=2, warmup=1)
    seed_everything(1)
    plain.train_epoch(1, max_batches=3)
    # the timed steps are the trainer's: same batches, negatives and Adam updates
    for (name, a), (_, b) in zip(
        timed.model.state_dict().items(), plain.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert all(len(times[name]) == 2 for name in (*PHASES, "step"))
    for i in range(2):  # the phases partition the step
        assert math.isclose(sum(times[name][i] for name in PHASES), times["step"][i], rel_tol=1e-9)

    result = run("tiny", steps=2, warmup=1, loader=lambda *_: data)
    assert result["model"] == "cm3" and "encoder_floor_ms" not in result  # features < 1024-d
    report = format_report(result)
    assert "| backward |" in report and "| step |" in report


def test_child_options_pass_folders_as_absolute_paths(tmp_path, monkeypatch):
    # a baseline child runs in its checkout's folder: a relative data root would point
    # elsewhere there (it did: "../shared/data" became /tmp/shared/data)
    monkeypatch.chdir(tmp_path)
    options = child_options("cpu", 7, "../data", "cache")
    assert options == [
        "--device", "cpu", "--steps", "7",
        "--data-root", str(tmp_path.parent / "data"),
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert child_options("cuda", 1, None, None) == ["--device", "cuda", "--steps", "1"]


def test_a_remeasured_scale_replaces_all_its_earlier_rows():
    previous = {
        "date": "old",
        "knn": ["old knn"],
        "train": [
            {"scale": "elec", "code": "revision 6c01c50"},
            {"scale": "tiktok", "code": "this revision", "s": 1},
            {"scale": "tiktok", "code": "baseline aaaa"},  # another sitting's baseline
            {"scale": "baby", "code": "this revision", "s": 2},
        ],
        "reference": [{"scale": "tiktok", "ratio": 0.3}, {"scale": "baby", "ratio": 0.5}],
    }
    result = {
        "date": "new",
        "train": [
            {"scale": "tiktok", "code": "this revision", "s": 3},
            {"scale": "tiktok", "code": "baseline bbbb"},
        ],
        "reference": [{"scale": "tiktok", "ratio": 0.2}],
    }
    out = merge_results(previous, result)
    assert out["date"] == "new" and out["knn"] == ["old knn"]
    assert out["train"] == [
        {"scale": "elec", "code": "revision 6c01c50"},
        {"scale": "baby", "code": "this revision", "s": 2},
        {"scale": "tiktok", "code": "this revision", "s": 3},
        {"scale": "tiktok", "code": "baseline bbbb"},
    ]
    assert out["reference"] == [{"scale": "baby", "ratio": 0.5}, {"scale": "tiktok", "ratio": 0.2}]


def test_interleaved_harness_imports_a_baseline_beside_this_revision(tmp_path):
    import importlib
    import sys

    from benchmarks.interleaved import BASELINE_NAME, build_trainer, extract_baseline

    extract_baseline("HEAD", tmp_path)
    sources = list((tmp_path / BASELINE_NAME).rglob("*.py"))
    assert sources and not any("from cm3_pyg." in p.read_text() for p in sources)
    sys.path.insert(0, str(tmp_path))
    try:
        from cm3_pyg.data import make_synthetic

        data = make_synthetic(num_users=60, num_items=80, seed=2)
        trainer = build_trainer(BASELINE_NAME, data)
        assert type(trainer).__module__ == f"{BASELINE_NAME}.training.trainer"
        assert type(trainer.model).__module__.startswith(BASELINE_NAME)
        loss = trainer.train_epoch(1, max_batches=1)
        assert isinstance(loss, float) and loss == loss  # one finite step of the old trainer
        ours = importlib.import_module("cm3_pyg.training.trainer")
        assert ours is not importlib.import_module(f"{BASELINE_NAME}.training.trainer")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.startswith(BASELINE_NAME)]:
            del sys.modules[name]
