"""The benchmark suite's own arithmetic and report (the timings themselves are not tested)."""

from __future__ import annotations

import math

import torch
from torch.nn import LeakyReLU, Linear, Sequential
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.run import encoder_flops, kernels_section, to_markdown


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


def test_sea_club_benchmark_sides_follow_the_same_trajectory():
    from benchmarks.sea_club import run

    out = run(rows=40, dim=4, pairs=2, steps=4, repeats=2)
    # both sides start from the same weights and take the same Adam steps on the same loss
    assert math.isclose(out["ours_final_nll"], out["plain_final_nll"], rel_tol=1e-5)
    assert out["ours_s"] > 0 and out["plain_s"] > 0
    assert math.isclose(out["ratio"], out["ours_s"] / out["plain_s"])
