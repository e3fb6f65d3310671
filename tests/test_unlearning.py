"""Unlearning: forget requests, the retain data, row tables, masked kNN graphs, the procedure."""

from __future__ import annotations

import copy

import pytest
import torch

from cm3_pyg.data.hetero import RATED_BY, RATES
from cm3_pyg.data.synthetic import make_synthetic
from cm3_pyg.data.transforms import ModalityKNNGraph
from cm3_pyg.errors import RequestError
from cm3_pyg.models import available_models, get_model_class
from cm3_pyg.training import training_defaults
from cm3_pyg.training.inputs import build_graph_inputs, get_splits
from cm3_pyg.training.trainer import Trainer, seed_everything
from cm3_pyg.unlearning import (
    ForgetRequest,
    ForgetTarget,
    UnlearningSettings,
    apply_retain,
    build_retain_data,
    forget_metrics,
    forget_target,
    load_retain,
    never_seen_recall,
    reset_seed,
    save_retain,
    unlearn,
)

NUM_USERS, NUM_ITEMS = 600, 400


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_users=NUM_USERS, num_items=NUM_ITEMS, seed=0)


def _config(cls, **extra):
    return {**training_defaults(), **cls.default_config(), "seed": 1, **extra}


# --------------------------------------------------------------------------- requests
@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (ForgetRequest("users", torch.tensor([], dtype=torch.long)), "empty"),
        (ForgetRequest("users", torch.tensor([3, 3])), "listed twice"),
        (ForgetRequest("users", torch.tensor([NUM_USERS])), "unknown"),
        (ForgetRequest("users", torch.tensor([-1])), "unknown"),
        (ForgetRequest("users", torch.arange(NUM_USERS)), "all 600"),
        (ForgetRequest("items", torch.tensor([0.5])), "integer"),
        (ForgetRequest("modality", torch.tensor([1]), "audio"), "modalities"),
        (ForgetRequest("rows", torch.tensor([1])), "kind"),
        (ForgetRequest("edges", torch.tensor([[0], [NUM_ITEMS]])), "item id"),
    ],
)
def test_bad_requests_are_refused_clearly(data, request_, message):
    with pytest.raises(RequestError, match=message):
        build_retain_data(data, request_)


def test_edge_requests_must_name_distinct_train_edges(data):
    train = get_splits(data).train
    edge = train[:, :1]
    with pytest.raises(RequestError, match="twice"):
        build_retain_data(data, ForgetRequest("edges", torch.cat([edge, edge], 1)))
    test_edge = get_splits(data).test[:, :1]
    with pytest.raises(RequestError, match="not a train interaction"):
        build_retain_data(data, ForgetRequest("edges", test_edge))
    with pytest.raises(RequestError, match="no train"):
        build_retain_data(data, ForgetRequest("edges", train))


# --------------------------------------------------------------------------- retain data
def _pairs(edges):
    return set(map(tuple, edges.t().tolist()))


def test_edge_request_removes_exactly_those_train_edges(data):
    splits = get_splits(data)
    forget = splits.train[:, ::7]
    retain = build_retain_data(data, ForgetRequest("edges", forget))
    new = get_splits(retain.data)
    assert _pairs(new.train) == _pairs(splits.train) - _pairs(forget)
    assert _pairs(retain.forget_edges) == _pairs(forget)
    assert torch.equal(new.test, splits.test) and torch.equal(new.valid, splits.valid)
    assert torch.equal(retain.data[RATED_BY].edge_index, new.train.flip(0))
    # the source is untouched
    assert torch.equal(get_splits(data).train, splits.train)


def test_user_request_removes_all_their_edges(data):
    users = torch.tensor([0, 5, 17])
    retain = build_retain_data(data, ForgetRequest("users", users))
    new = get_splits(retain.data)
    for edges in (new.train, new.valid, new.test):
        assert not torch.isin(edges[0], users).any()
    old_train = get_splits(data).train
    assert _pairs(retain.forget_edges) == _pairs(old_train[:, torch.isin(old_train[0], users)])
    assert torch.equal(retain.reset_users, users)


def test_item_request_removes_edges_features_and_graph_rows(data):
    items = torch.tensor([1, 2, 30, 399])
    retain = build_retain_data(data, ForgetRequest("items", items))
    new = get_splits(retain.data)
    for edges in (new.train, new.valid, new.test):
        assert not torch.isin(edges[1], items).any()
    for m in data.modalities:
        assert retain.data["item"][f"x_{m}"][items].abs().sum() == 0
        assert not retain.data["item"][f"keep_{m}"][items].any()
        # the other rows are the source's
        others = torch.ones(NUM_ITEMS, dtype=torch.bool)
        others[items] = False
        assert torch.equal(retain.data["item"][f"x_{m}"][others], data["item"][f"x_{m}"][others])
    graph = ModalityKNNGraph(k=10)(retain.data.clone())
    store = graph["item", "mm_knn", "item"]
    assert not torch.isin(store.edge_index, items).any()


def test_masked_knn_graph_equals_the_graph_of_the_kept_rows_alone():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    keep = torch.ones(50, dtype=torch.bool)
    keep[[3, 10, 11, 49]] = False
    view = make_synthetic(num_users=20, num_items=50, seed=0)
    view.modalities = ["image"]
    view["item"].x_image = x
    view["item"].keep_image = keep
    graph = ModalityKNNGraph(k=5)(view)["item", "image_knn", "item"]
    kept = keep.nonzero().flatten()
    # brute force on the kept rows: each kept row's 5 most cosine-similar kept rows
    unit = torch.nn.functional.normalize(x[kept].double(), dim=1)
    expected = set()
    for local, row in enumerate(kept.tolist()):
        best = (unit @ unit[local]).topk(5).indices
        expected |= {(row, int(kept[j])) for j in best}
    assert _pairs(graph.edge_index) == expected
    assert torch.allclose(graph.edge_weight, torch.full_like(graph.edge_weight, 1 / 5))


def test_modality_request_keeps_edges_and_other_modalities(data):
    items = torch.tensor([4, 8, 15])
    retain = build_retain_data(data, ForgetRequest("modality", items, "image"))
    assert torch.equal(get_splits(retain.data).train, get_splits(data).train)
    assert retain.forget_edges.size(1) == 0
    assert retain.data["item"].x_image[items].abs().sum() == 0
    assert torch.equal(retain.data["item"].x_text, data["item"].x_text)
    assert "keep_text" not in retain.data["item"]
    assert retain.modality_index == data.modalities.index("image")


def test_retain_file_round_trip_holds_no_forgotten_edge(data, tmp_path):
    splits = get_splits(data)
    forget = splits.train[:, ::5]
    items = torch.tensor([7, 9])
    retain = build_retain_data(data, ForgetRequest("edges", forget))
    retain = build_retain_data(retain.data, ForgetRequest("modality", items, "text"))
    path = tmp_path / "retain.pt"
    save_retain(path, retain.data)
    saved = load_retain(path)
    # nothing of the forgotten data is in the file: no forgotten edge in any split, no
    # feature table at all
    for edges in saved["splits"].values():
        assert not _pairs(edges) & _pairs(forget)
    assert set(saved["keep"]) == {"text"}
    rebuilt = apply_retain(data, saved)
    for key in ("edge_index", "valid_edge_index", "test_edge_index"):
        assert torch.equal(rebuilt[RATES][key], retain.data[RATES][key])
    for m in data.modalities:
        assert torch.equal(rebuilt["item"][f"x_{m}"], retain.data["item"][f"x_{m}"])


# --------------------------------------------------------------------------- row tables
@pytest.mark.parametrize("name", available_models())
def test_row_tables_cover_every_user_or_item_sized_tensor(data, name):
    cls = get_model_class(name)
    config = _config(cls, objective="nbpo" if cls.objectives else None)
    inputs = build_graph_inputs(data, config, cls.uses_item_graph)
    model = cls.from_config(config, inputs)
    declared = {t.name: t for t in model.row_tables()}
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for tname, tensor in tensors.items():
        sized = [a for a, n in enumerate(tensor.shape) if n in (NUM_USERS, NUM_ITEMS)]
        if sized:
            assert tname in declared, f"{name}: {tname} {tuple(tensor.shape)} is not declared"
            table = declared[tname]
            size = NUM_USERS if table.kind == "user" else NUM_ITEMS
            assert tensor.shape[table.axis] == size
    for tname in declared:
        assert tname in tensors


@pytest.mark.parametrize("name", ["cm3", "freedom", "lirdrec"])
def test_copy_rows_writes_only_the_named_rows(data, name):
    cls = get_model_class(name)
    config = _config(cls)
    inputs = build_graph_inputs(data, config, cls.uses_item_graph)
    torch.manual_seed(0)
    model = cls.from_config(config, inputs)
    torch.manual_seed(1)
    fresh = cls.from_config(config, inputs)
    before = copy.deepcopy(model.state_dict())
    users, items = torch.tensor([2, 9]), torch.tensor([0, 399])
    written = model.copy_rows(fresh, users=users, items=items)
    assert written
    state, other = model.state_dict(), fresh.state_dict()
    for table in model.row_tables():
        ids = users if table.kind == "user" else items
        rows = state[table.name].index_select(table.axis, ids)
        assert torch.equal(rows, other[table.name].index_select(table.axis, ids))
        keep = torch.ones(state[table.name].size(table.axis), dtype=torch.bool)
        keep[ids] = False
        index = keep.nonzero().flatten()
        assert torch.equal(
            state[table.name].index_select(table.axis, index),
            before[table.name].index_select(table.axis, index),
        )
    for key in state:
        if key not in written:
            assert torch.equal(state[key], before[key])


# --------------------------------------------------------------------------- procedure
def _train(cls, data, config):
    seed_everything(1)
    inputs = build_graph_inputs(data, config, cls.uses_item_graph)
    model = cls.from_config(config, inputs)
    Trainer(model, inputs, get_splits(data), config, progress=False).fit()
    return model, inputs


@pytest.mark.parametrize("name", ["lightgcn", "cm3"])
def test_unlearning_users_moves_forget_recall_toward_gold(data, name):
    cls = get_model_class(name)
    config = _config(cls, epochs=10 if name == "cm3" else 30)
    original, original_inputs = _train(cls, data, config)
    users = torch.randperm(NUM_USERS, generator=torch.Generator().manual_seed(0))[:30]
    retain = build_retain_data(data, ForgetRequest("users", users))
    splits = get_splits(retain.data)
    gold, gold_inputs = _train(cls, retain.data, config)
    inputs = build_graph_inputs(retain.data, config, cls.uses_item_graph)

    def recall(model, model_inputs):
        metrics = forget_metrics(model, model_inputs, splits.train, retain.forget_edges)
        return metrics["recall@20"]

    r_original, r_gold = recall(original, original_inputs), recall(gold, gold_inputs)
    assert r_original > 2 * r_gold  # the trained model remembers its train edges
    model = copy.deepcopy(original)
    seed_everything(reset_seed(1))  # as unlearn_run: not the original's initial rows
    fresh = cls.from_config(config, inputs)
    model.copy_rows(fresh, users=retain.reset_users)
    target = forget_target(original, original_inputs, splits, retain.forget_edges, "users")
    result = unlearn(
        model, inputs, splits, retain.forget_edges, config, UnlearningSettings(alpha=0.5), target
    )
    r_unlearned = recall(model, inputs)
    assert result.history and result.stop_reason == "target"  # checked from step 0
    assert abs(r_unlearned - r_gold) < 0.5 * abs(r_original - r_gold)
    assert abs(r_unlearned - r_gold) <= 0.5 * r_gold
    # the retain side holds: test recall stays near the original's
    test = Trainer(model, inputs, splits, config, progress=False).evaluate("test")["recall@20"]
    before = Trainer(original, original_inputs, splits, config, progress=False)
    assert test >= 0.9 * before.evaluate("test")["recall@20"]
    # the forgotten users' rows are the fresh draw: the reverse term leaves users without
    # data alone, and nothing of the original's rows survives
    for table in model.row_tables():
        if table.kind == "user":
            mine = dict(model.named_parameters())[table.name].index_select(table.axis, users)
            new = dict(fresh.named_parameters())[table.name].index_select(table.axis, users)
            old = dict(original.named_parameters())[table.name].index_select(table.axis, users)
            assert torch.equal(mine, new) and not torch.equal(mine, old)


def test_never_seen_recall_matches_a_brute_force_ranking(data):
    cls = get_model_class("lightgcn")
    config = _config(cls, epochs=5)
    model, inputs = _train(cls, data, config)
    retain = build_retain_data(data, ForgetRequest("users", torch.tensor([7, 21])))
    splits = get_splits(retain.data)
    retain_inputs = build_graph_inputs(retain.data, config, cls.uses_item_graph)
    forget = retain.forget_edges
    # two users: the only derangement swaps them, whatever the draw
    got = never_seen_recall(model, retain_inputs, splits.train, forget, k=20, draws=3)
    with torch.no_grad():
        user_emb, item_emb = model.embed(retain_inputs)
    recalls = []
    for user, stand_in in ((7, 21), (21, 7)):
        scores = item_emb.double() @ user_emb[stand_in].double()
        top = set(scores.topk(20).indices.tolist())  # a forgotten user keeps no train item
        targets = set(forget[1, forget[0] == user].tolist())
        recalls.append(len(top & targets) / len(targets))
    assert got == pytest.approx(sum(recalls) / 2, abs=1e-6)
    one = build_retain_data(data, ForgetRequest("users", torch.tensor([7])))
    alone = never_seen_recall(model, retain_inputs, get_splits(one.data).train, one.forget_edges)
    assert alone == pytest.approx(20 / NUM_ITEMS)  # nothing to pair with: chance level


def test_user_requests_stop_at_the_never_seen_recall_of_the_current_model(data):
    cls = get_model_class("lightgcn")
    config = _config(cls, epochs=3)
    model, inputs = _train(cls, data, config)
    users = torch.tensor([1, 5, 9])
    retain = build_retain_data(data, ForgetRequest("users", users))
    splits = get_splits(retain.data)
    target = forget_target(model, inputs, splits, retain.forget_edges, "users")
    assert target.rule == "never_seen" and target.value is None
    retain_inputs = build_graph_inputs(retain.data, config, cls.uses_item_graph)
    expected = never_seen_recall(model, retain_inputs, splits.train, retain.forget_edges)
    assert target.current(model, retain_inputs) == expected
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.item_embedding.mul_(-1.0)  # a different item side: a new target
    assert target.current(other, retain_inputs) != expected
    edges = forget_target(model, inputs, splits, retain.forget_edges, "edges")
    items = forget_target(model, inputs, splits, retain.forget_edges, "items")
    assert edges.rule in ("held_out", "chance") and items.rule == "chance"
    assert items.value == pytest.approx(20 / NUM_ITEMS, rel=0.05)


def test_users_left_without_data_keep_their_reset_rows(data):
    cls = get_model_class("lightgcn")
    config = _config(cls, epochs=3, weight_decay=0.0)
    model, _ = _train(cls, data, config)
    users = torch.tensor([2, 8, 40])
    retain = build_retain_data(data, ForgetRequest("users", users))
    splits = get_splits(retain.data)
    inputs = build_graph_inputs(retain.data, config, cls.uses_item_graph)
    items_before = model.item_embedding.detach().clone()
    rows_before = model.user_embedding.detach()[users].clone()
    never = ForgetTarget("chance", -1.0)  # never reached: the whole budget runs
    result = unlearn(
        model, inputs, splits, retain.forget_edges, config, UnlearningSettings(max_epochs=1), never
    )
    assert result.steps > 0 and result.stop_reason == "max_epochs"
    assert torch.equal(model.user_embedding.detach()[users], rows_before)
    assert not torch.equal(model.item_embedding.detach(), items_before)


def test_reset_rows_are_not_the_original_initial_rows(data):
    # Redrawing with the run's own seed would give back the rows the trained item side grew
    # around; the reset must be an independent draw.
    cls = get_model_class("lightgcn")
    config = _config(cls)
    inputs = build_graph_inputs(data, config, cls.uses_item_graph)
    seed_everything(config["seed"])
    initial = cls.from_config(config, inputs).user_embedding.detach().clone()
    seed_everything(reset_seed(config["seed"]))
    reset = cls.from_config(config, inputs).user_embedding.detach()
    assert not torch.isclose(initial, reset).any()
    assert reset_seed(config["seed"]) == reset_seed(config["seed"]) != reset_seed(2)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="alpha"):
        UnlearningSettings(alpha=1.5)
    with pytest.raises(ValueError, match="min_epochs"):
        UnlearningSettings(min_epochs=9, max_epochs=5)


# --------------------------------------------------------------------------- the command
def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def test_unlearn_command_writes_a_loadable_run_without_the_forgotten_data(tmp_path):
    from cm3_pyg import load_run
    from cm3_pyg.cli import main as train_main
    from cm3_pyg.cli.unlearn import main as unlearn_main

    run = tmp_path / "run"
    assert (
        train_main(["--model", "lightgcn", "--epochs", "3", "--out", str(run), "--no-progress"])
        == 0
    )
    original = load_run(run)
    train = original.splits.train
    forget = train[:, train[0] == int(train[0, 0])]  # all edges of one user
    edges = tmp_path / "edges.tsv"
    edges.write_text("".join(f"{u}\t{i}\n" for u, i in forget.t().tolist()), encoding="utf-8")
    out = tmp_path / "unlearned"
    assert (
        unlearn_main(
            ["--run", str(run), "--forget-edges", str(edges), "--finetune", "--out", str(out)]
        )
        == 0
    )
    report = __import__("json").loads((out / "unlearn.json").read_text(encoding="utf-8"))
    assert report["request"] == {"kind": "edges", "count": forget.size(1)}
    assert report["gold"] is None and report["finetune"] is not None
    assert report["unlearned"]["forget"]["recall@20"] < report["original"]["forget"]["recall@20"]
    loaded = load_run(out)
    assert loaded.splits.train.size(1) == train.size(1) - forget.size(1)
    # no saved tensor holds a forgotten (user, item) pair as a column of an edge index
    keys = set((forget[0] * 10**6 + forget[1]).tolist())
    for name in ("checkpoint.pt", "retain.pt"):
        saved = torch.load(out / name, weights_only=True)
        for tensor in _tensors(saved):
            if tensor.dim() == 2 and tensor.size(0) == 2 and not tensor.is_floating_point():
                assert not keys & set((tensor[0] * 10**6 + tensor[1]).tolist()), name
        optimizer = saved.get("trainer", {}).get("optimizer", {"state": {}})
        assert optimizer["state"] == {}  # a fresh optimiser: no moments survive
    # the serving artifact keeps its excluded (train) items per user as CSR rows
    from cm3_pyg.serving import load_artifact

    art = load_artifact(out)
    for u, i in forget.t().tolist():
        row = art.exclude_items[int(art.exclude_ptr[u]) : int(art.exclude_ptr[u + 1])]
        assert i not in row.tolist()


def test_unlearn_command_refuses_bad_requests_and_writes_nothing(tmp_path, capsys):
    from cm3_pyg.cli import main as train_main
    from cm3_pyg.cli.unlearn import main as unlearn_main

    run = tmp_path / "run"
    assert (
        train_main(["--model", "bprmf", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    )
    cases = {
        "dup.txt": ("3\n3\n", "listed twice"),
        "neg.txt": ("-4\n", "line 1"),
        "empty.txt": ("# nothing\n", "empty"),
        "word.txt": ("7\nseven\n", "line 2"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        out = tmp_path / f"out-{name}"
        assert (
            unlearn_main(["--run", str(run), "--forget-users", str(path), "--out", str(out)]) == 2
        )
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]
