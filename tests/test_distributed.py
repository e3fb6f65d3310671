"""Multi-process training (torchrun, gloo) against one process, and its row-parallel pieces."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from benchmarks.distributed_parity import ALL_MODELS, compare, launch
from benchmarks.distributed_scaling import Graph, cm3_parameters, cm3_traffic, lightgcn_traffic
from cm3_pyg.data import make_synthetic
from cm3_pyg.metrics import FullRankingEvaluator
from cm3_pyg.models import CM3, get_model_class
from cm3_pyg.nn import feature_linear, to_adjacency
from cm3_pyg.nn.parallel import RowShard, RowSplit, active_split, row_bounds, split_rows
from cm3_pyg.training import load_config
from cm3_pyg.training.distributed import World, world_from_env
from cm3_pyg.training.inputs import build_graph_inputs

USERS, ITEMS = 300, 200


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        # relative 1e-5; CM3's loss crosses zero, where a relative bound means nothing
        assert abs(x - y) <= 1e-5 * max(abs(x), 0.1), (step, x, y)


def test_row_bounds_cover_the_rows_in_equal_strides():
    for n in (0, 1, 5, 7, 100):
        for p in (1, 2, 3, 4):
            blocks = [row_bounds(n, r, p) for r in range(p)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(blocks[r][1] == blocks[r + 1][0] for r in range(p - 1))
            stride = -(-n // p)
            # block r starts at r * ceil(n / p): where the all-gathered buffer puts it
            assert all(start == min(n, r * stride) for r, (start, _) in enumerate(blocks))
    assert row_bounds(7, 1, 3) == (3, 6) and row_bounds(7, 2, 3) == (6, 7)
    assert row_bounds(5, 3, 4) == (5, 5)  # strides of 2: the last process has no rows
    with pytest.raises(ValueError, match="rank must lie in"):
        row_bounds(5, 2, 2)


def test_split_rows_is_inert_for_one_process_and_nests():
    assert active_split() is None
    with split_rows(RowSplit(0, 1)):
        assert active_split() is None
    with split_rows(RowSplit(1, 3)), split_rows(RowSplit(0, 2)):
        assert active_split() == RowSplit(0, 2)
    assert active_split() is None


def _gather_worker(rank: int, world_size: int, store_path: str, num_rows: int, out: str) -> None:
    import torch.distributed as dist

    from cm3_pyg.nn.parallel import gather_rows

    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        split = RowSplit(rank, world_size)
        start, end = split.bounds(num_rows)
        table = torch.arange(num_rows * 3, dtype=torch.float64).view(num_rows, 3)
        local = table[start:end].clone().requires_grad_(True)
        full = gather_rows(local, num_rows, split)
        # each process's own gradient of the gathered table: (rank + 1) * its values
        (full * table * (rank + 1)).sum().backward()
        torch.save({"full": full.detach(), "grad": local.grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_rows_pads_short_blocks_and_sums_every_gradient(tmp_path):
    """Uneven blocks (5 rows on 4 processes: 2, 2, 1, 0): the forward is the whole table on
    every process and the backward each process's rows of the sum of all processes'
    gradients, sum_r (r + 1) * table."""
    import torch.multiprocessing as mp

    num_rows, world_size = 5, 4
    out = str(tmp_path / "result")
    mp.spawn(
        _gather_worker,
        args=(world_size, str(tmp_path / "store"), num_rows, out),
        nprocs=world_size,
        join=True,
    )
    table = torch.arange(num_rows * 3, dtype=torch.float64).view(num_rows, 3)
    total = table * sum(r + 1 for r in range(world_size))
    for rank in range(world_size):
        got = torch.load(f"{out}.{rank}")
        start, end = row_bounds(num_rows, rank, world_size)
        assert torch.equal(got["full"], table)
        assert torch.equal(got["grad"], total[start:end])


def _knn_worker(rank: int, world_size: int, store_path: str, out: str) -> None:
    import torch.distributed as dist

    from cm3_pyg.training.distributed import divided_cosine_topk

    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        data = make_synthetic(num_users=30, num_items=21, seed=0)
        x = data["item"]["x_image"]
        split = RowSplit(rank, world_size)
        values, indices = divided_cosine_topk(x, 4, block_size=2, split=split)
        # and through the inputs a run builds (kNN of both modalities, combined)
        inputs = build_graph_inputs(
            data, load_config(CM3.default_config()), world=World(rank, world_size)
        )
        item_adj = inputs.item_adj
        torch.save(
            {"values": values, "indices": indices, "item_adj": item_adj.to_dense()},
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_the_divided_knn_search_finds_the_single_process_neighbours(tmp_path):
    """21 items on 4 processes (11 blocks of 2 query rows: shares of 6, 6, 6 and 3 rows):
    every process ends with exactly the neighbours, similarities and item graph of the
    undivided search."""
    import torch.multiprocessing as mp

    from cm3_pyg.data.graphs import cosine_topk

    world_size = 4
    out = str(tmp_path / "result")
    mp.spawn(
        _knn_worker, args=(world_size, str(tmp_path / "store"), out), nprocs=world_size, join=True
    )
    data = make_synthetic(num_users=30, num_items=21, seed=0)
    values, indices = cosine_topk(data["item"]["x_image"], 4, block_size=2)
    item_adj = build_graph_inputs(data, load_config(CM3.default_config())).item_adj
    for rank in range(world_size):
        got = torch.load(f"{out}.{rank}")
        assert torch.equal(got["values"], values) and torch.equal(got["indices"], indices)
        assert torch.equal(got["item_adj"], item_adj.to_dense())


def _optimizer_worker(rank: int, world_size: int, store_path: str, out: str) -> None:
    import functools

    import torch.distributed as dist

    from cm3_pyg.nn.optim import make_optimizer
    from cm3_pyg.training.distributed import DividedOptimizer

    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        world = World(rank, world_size)

        def tables() -> list[torch.Tensor]:
            g = torch.Generator().manual_seed(0)
            shapes = ((3, 2), (5,), (1,))  # 11 elements in group 0 (blocks 3, 3, 3, 2), 1
            return [
                torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes
            ]

        def groups(ts: list[torch.Tensor]) -> list[dict]:
            return [
                {"params": ts[:2], "weight_decay": 0.1},
                {"params": ts[2:], "weight_decay": 0.0},
            ]

        make = functools.partial(make_optimizer, "adam", lr=0.05)
        ours_t, ref_t = tables(), tables()
        ours, ref = DividedOptimizer(groups(ours_t), make, world), make(groups(ref_t))
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref_t]
            for i, (a, b, grad) in enumerate(zip(ours_t, ref_t, grads, strict=True)):
                skip = step == 1 and i == 1  # no gradient: skipped, as by Adam itself
                # each process's share; the optimiser sums them (world_size 4: exact)
                a.grad = None if skip else grad / world_size
                b.grad = None if skip else grad
            if step == 2:  # the model changes a parameter itself, and the lr changes
                with torch.no_grad():
                    ours_t[0].mul_(0.5)
                    ref_t[0].mul_(0.5)
                ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.01
            ours.step()
            ref.step()
        state = ours.state_dict()  # collective
        # resume from the undivided optimiser's state on a fresh divided one, one more step
        again_t = [t.detach().clone().requires_grad_() for t in ref_t]
        again = DividedOptimizer(groups(again_t), make, world)
        again.load_state_dict(ref.state_dict())
        for a, b in zip(again_t, ref_t, strict=True):
            a.grad = torch.ones_like(a) / world_size
            b.grad = torch.ones_like(b)
        again.step()
        ref.step()
        torch.save(
            {
                "ours": [t.detach() for t in ours_t],
                "state": state,
                "again": [t.detach() for t in again_t],
                "ref": [t.detach() for t in ref_t],
                "ref_state": ref.state_dict(),
            },
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_divided_optimizer_takes_the_undivided_steps_and_states(tmp_path):
    """DividedOptimizer on 4 processes (uneven blocks; a group of one element that three
    processes own nothing of; a step without a gradient; a parameter changed in place; an
    lr change) against one Adam: the same parameters, the undivided ``state_dict``, and a
    resume from the undivided state that continues alike."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(_optimizer_worker, args=(4, str(tmp_path / "store"), out), nprocs=4, join=True)
    for rank in range(4):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        # after 4 steps the reference stepped once more: compare the resumed run with it
        for a, b in zip(got["again"], got["ref"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        ref_state = got["ref_state"]
        assert got["state"]["param_groups"][0]["lr"] == 0.01
        assert set(got["state"]["state"]) == set(ref_state["state"]) == {0, 1, 2}
        assert got["state"]["state"][1]["step"] == 3  # one step had no gradient
    # the divided run before the resume: parameters and state of the undivided Adam after 4
    # steps (recomputed here in one process)
    import functools

    from cm3_pyg.nn.optim import make_optimizer

    g0 = torch.Generator().manual_seed(0)
    ref_t = [
        torch.randn(s, generator=g0, dtype=torch.float64).requires_grad_()
        for s in ((3, 2), (5,), (1,))
    ]
    ref = functools.partial(make_optimizer, "adam", lr=0.05)(
        [{"params": ref_t[:2], "weight_decay": 0.1}, {"params": ref_t[2:], "weight_decay": 0.0}]
    )
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ref_t]
        for i, (t, grad) in enumerate(zip(ref_t, grads, strict=True)):
            t.grad = None if step == 1 and i == 1 else grad
        if step == 2:
            with torch.no_grad():
                ref_t[0].mul_(0.5)
            ref.param_groups[0]["lr"] = 0.01
        ref.step()
    want = ref.state_dict()
    for rank in range(4):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        for a, b in zip(got["ours"], ref_t, strict=True):
            torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
        for index, entry in want["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(
                    torch.as_tensor(got["state"]["state"][index][key]),
                    value,
                    rtol=1e-12,
                    atol=1e-12,
                )


def test_a_row_shard_holds_its_block_and_stands_for_the_table():
    table = torch.randn(7, 5, dtype=torch.float64)
    weight, bias = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    shard = RowShard.of(table, RowSplit(1, 2))
    assert torch.equal(shard.local, table[4:]) and shard.local.data_ptr() != table.data_ptr()
    assert shard.shape == table.shape and shard.size(1) == 5 and shard.dim() == 2
    assert shard.start == 4 and shard.dtype == torch.float64
    assert "rows [4, 7) of [7, 5], process 1 of 2" in repr(shard)
    assert shard.to(torch.float32).local.dtype == torch.float32
    # one process: the block is the table, and the encoder is F.linear of it
    whole = RowShard.of(table, RowSplit(0, 1))
    expected = torch.nn.functional.linear(table, weight, bias)
    torch.testing.assert_close(feature_linear(whole, weight, bias), expected)
    # the other rows are elsewhere: read outside split_rows, or in another group, it refuses
    with pytest.raises(ValueError, match=r"holds rows \[4, 7\) of 7 only.*outside split_rows"):
        feature_linear(shard, weight, bias)
    with split_rows(RowSplit(0, 2)), pytest.raises(ValueError, match="process 0 of 2"):
        feature_linear(shard, weight, bias)
    with pytest.raises(ValueError, match=r"holds rows \[0, 4\) of 7, got a block of shape \[3"):
        RowShard(table[:3], 7, RowSplit(0, 2))


def test_a_run_hands_its_trainer_views_of_the_feature_blocks():
    """run_experiment keeps the dataset (and its full tables) to the end, so each process's
    block is a view of the table (RowShard.of_each(copy=False)), not a copy beside it."""
    data = make_synthetic(num_users=30, num_items=21, seed=0)
    inputs = build_graph_inputs(data, load_config(CM3.default_config()), uses_item_graph=True)
    for rank in range(2):
        blocks = RowShard.of_each(inputs.features, World(rank, 2).split, copy=False)
        for table, shard in zip(inputs.features, blocks, strict=True):
            assert isinstance(shard, RowShard) and shard.num_rows == 21
            start, end = row_bounds(21, rank, 2)
            assert torch.equal(shard.local, table[start:end])
            assert shard.local.data_ptr() == table[start].data_ptr()  # the same memory
            assert shard.local.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()
        assert RowShard.of_each(blocks, World(rank, 2).split) == blocks  # kept as they are
    view = RowShard.view(inputs.features[0], RowSplit(1, 2))
    copy = RowShard.of(inputs.features[0], RowSplit(1, 2))
    assert torch.equal(view.local, copy.local) and view.local.data_ptr() != copy.local.data_ptr()


@pytest.mark.parametrize("backend", ["csr", "edge_index"])
def test_row_block_is_the_dense_rows(backend):
    gen = torch.Generator().manual_seed(0)
    n, c = 23, 17
    dense = torch.rand(n, c, generator=gen) * (torch.rand(n, c, generator=gen) < 0.3)
    index = dense.nonzero().t()
    adj = to_adjacency(index, dense[index[0], index[1]], n, c, backend=backend)
    x = torch.randn(c, 5, generator=gen, dtype=torch.float32)
    for p in (2, 3):
        parts = []
        for r in range(p):
            block = adj.row_block(r, p)
            start, end = row_bounds(n, r, p)
            assert block.shape == (end - start, c)
            torch.testing.assert_close(block.to_dense(), dense[start:end])
            parts.append(block.matmul(x))
        torch.testing.assert_close(torch.cat(parts), dense @ x, rtol=1e-5, atol=1e-6)
    assert adj.row_block(1, 2) is adj.row_block(1, 2)  # cached


def test_user_blocks_sum_to_the_full_evaluation():
    gen = torch.Generator().manual_seed(1)
    users, items = 40, 30
    train = torch.stack(
        [
            torch.randint(0, users, (200,), generator=gen),
            torch.randint(0, items, (200,), generator=gen),
        ]
    )
    target = torch.stack(
        [
            torch.randint(0, users, (60,), generator=gen),
            torch.randint(0, items, (60,), generator=gen),
        ]
    )
    user_emb, item_emb = torch.randn(users, 8, generator=gen), torch.randn(items, 8, generator=gen)
    full = FullRankingEvaluator(items, train, target, (5, 10), batch_size=7)
    expected = full.evaluate(user_emb, item_emb)
    for p in (2, 3, 100):  # 100 processes: most blocks are empty
        total = None
        counted = 0
        for r in range(p):
            block = World(r, p).user_block(items, train, target, (5, 10), 7)
            if block is None:
                continue
            counted += block.num_eval_users
            sums = block.evaluate_sums(user_emb, item_emb)
            total = sums if total is None else total + sums
        assert counted == full.num_eval_users
        for key, value in total.averages().items():
            assert value == pytest.approx(expected[key], abs=1e-12)


def test_a_single_process_has_no_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_from_env("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert world_from_env("cpu") is None


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("one")
    return launch(1, ALL_MODELS, 2, USERS, ITEMS, work)


def test_two_processes_take_the_single_process_steps(single_run, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): every model's per-step losses and final metrics
    equal one process's at the same global batch."""
    multi = launch(2, ALL_MODELS, 2, USERS, ITEMS, tmp_path)
    rows = compare(single_run, multi)
    assert set(rows) == set(ALL_MODELS)
    for name in ALL_MODELS:
        _close(single_run[name]["losses"], multi[name]["losses"])
        assert rows[name]["metric_abs"] <= 1e-4, name
        assert multi[name]["world_size"] == 2 and single_run[name]["world_size"] == 1
    # the scaling model's traffic equals what the collectives were handed (2 processes)
    graph = Graph(USERS, ITEMS, (64, 48), ui_nnz=0, item_nnz=0)  # make_synthetic's modalities
    for name, model in (("cm3", cm3_traffic), ("lightgcn", lightgcn_traffic)):
        step, evaluation = model(graph, 2)
        steps, evals = len(multi[name]["losses"]), multi[name]["epochs_run"]
        counted = multi[name]["traffic"]
        assert counted["gathers"] == steps * step.gathers + evals * evaluation.gathers, name
        assert counted["gathered"] == steps * step.gathered + evals * evaluation.gathered, name
        assert counted["scatters"] == steps * step.scatters, name
        assert counted["scattered"] == steps * step.scattered, name
        assert counted["reduces"] == steps * step.reduces, name
        assert counted["reduced"] == steps * step.reduced, name
    # CM3 and LIRDRec read their features row-wise only: each process keeps half of every
    # table's rows (and still takes the single-process steps, above)
    row_local = {name for name in ALL_MODELS if get_model_class(name).row_local_features}
    assert row_local == {"cm3", "lirdrec"}
    for name in ALL_MODELS:
        held = multi[name]["feature_rows_held"]
        full = single_run[name]["feature_rows_held"]
        assert len(held) == 2 and len(full) == 1, name
        assert full == [[ITEMS, ITEMS]], name  # make_synthetic: image and text tables
        if name in row_local:
            assert held == [[ITEMS // 2] * 2] * 2, name
        else:
            assert held == [full[0], full[0]], name
    # rank 0 wrote the run's files, once
    metrics = json.loads((tmp_path / "runs-p2" / "cm3" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert (tmp_path / "runs-p2" / "cm3" / "checkpoint.pt").exists()


def test_a_two_process_checkpoint_resumes_in_one_process(single_run, tmp_path):
    """State is the same on every process, so a checkpoint resumes with any process count:
    one epoch on 2 processes, then the second in one process, equals two epochs in one."""
    models = ("cm3", "sea")  # sea: an inner problem with its own optimiser state
    folder = tmp_path / "runs"
    first = launch(2, models, 1, USERS, ITEMS, tmp_path, folder=folder)
    second = launch(1, models, 2, USERS, ITEMS, tmp_path, folder=folder, resume=True)
    for name in models:
        resumed = first[name]["losses"] + second[name]["losses"]
        _close(single_run[name]["losses"], resumed)
        for split in ("valid", "test"):
            for key, value in single_run[name][split].items():
                assert second[name][split][key] == pytest.approx(value, abs=1e-4)
    shutil.rmtree(folder)


def test_compare_refuses_to_run_under_torchrun(monkeypatch, capsys):
    from cm3_pyg.cli.compare import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--models", "cm3", "--seeds", "1"]) == 2
    assert "compare runs its grid in one process" in capsys.readouterr().err


def test_cm3_parameter_count_is_the_models():
    from cm3_pyg.models import CM3

    model = CM3(300, 200, [64, 48])
    graph = Graph(300, 200, (64, 48), ui_nnz=0, item_nnz=0)
    assert cm3_parameters(graph) == sum(p.numel() for p in model.parameters())
