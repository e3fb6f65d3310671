"""Propagation and sparse kernels against dense float64 algebra and PyG's LGConv."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import LGConv

from cm3_pyg.data import bipartite_normalized_adjacency
from cm3_pyg.nn import UserItemPropagation, propagate_item_graph, spmm, to_adjacency
from cm3_pyg.nn.sparse import available_backends, check_backend


def random_bipartite(num_users=30, num_items=20, num_edges=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(num_users, (num_edges,), generator=g)
    items = torch.randint(num_items, (num_edges,), generator=g)
    return torch.stack([users, items])


def dense(edge_index, edge_weight, n):
    a = torch.zeros(n, n, dtype=torch.float64)
    a.index_put_((edge_index[0], edge_index[1]), edge_weight.double(), accumulate=True)
    return a


@pytest.mark.parametrize("combine", ["sum", "mean", "last"])
def test_propagation_matches_dense_powers(combine):
    ui = random_bipartite()
    index, weight = bipartite_normalized_adjacency(ui, 30, 20)
    n = 50
    x = torch.randn(n, 8, dtype=torch.float64)
    a = dense(index, weight, n)
    layers = [x]
    for _ in range(3):
        layers.append(a @ layers[-1])
    expected = {
        "sum": sum(layers),
        "mean": sum(layers) / 4,
        "last": layers[-1],
    }[combine]
    conv = UserItemPropagation(3, combine)
    adj = to_adjacency(index, weight.double(), n)
    torch.testing.assert_close(conv(x, adj), expected)
    # explicit message passing over edge_index gives the same (symmetric graph)
    torch.testing.assert_close(conv(x, index, weight.double()), expected)


def test_one_layer_matches_pyg_lgconv():
    # LGConv normalises D^-1/2 A D^-1/2 itself; ours takes the pre-normalised matrix.
    ui = random_bipartite(seed=1)
    index, weight = bipartite_normalized_adjacency(ui, 30, 20)
    x = torch.randn(50, 4)
    ours = UserItemPropagation(1, combine="last")(x, to_adjacency(index, weight, 50))
    theirs = LGConv(normalize=True)(x, index)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_gradients_flow_through_sparse_product():
    index = torch.tensor([[0, 1, 2, 2], [1, 0, 0, 2]])
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    adj = to_adjacency(index, weight, 3)
    (spmm(adj, x) ** 2).sum().backward()
    a = dense(index, weight, 3)
    expected = 2 * a.t() @ (a @ x.detach())
    torch.testing.assert_close(x.grad, expected)


def test_item_graph_step_and_rectangular_adjacency():
    index = torch.tensor([[0, 0, 1, 2], [0, 1, 1, 0]])
    weight = torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)
    h = torch.randn(3, 2, dtype=torch.float64)
    s = dense(index, weight, 3)
    adj = to_adjacency(index, weight, 3)
    torch.testing.assert_close(propagate_item_graph(h, adj, 1), h + s @ h)
    torch.testing.assert_close(propagate_item_graph(h, adj, 2), h + s @ s @ h)
    torch.testing.assert_close(propagate_item_graph(h, adj, 0), h)
    rect = to_adjacency(torch.tensor([[0, 1], [3, 2]]), None, 2, 4)
    assert tuple(rect.shape) == (2, 4)


def test_backend_selection_and_errors():
    assert "csr" in available_backends()
    assert check_backend("auto") == "auto"
    with pytest.raises(ValueError, match="unknown sparse backend"):
        check_backend("dense")
    with pytest.raises(TypeError, match="sparse adjacency"):
        spmm(torch.eye(3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="num_layers"):
        UserItemPropagation(-1)
    with pytest.raises(ValueError, match="combine"):
        UserItemPropagation(2, combine="max")
    assert repr(UserItemPropagation(3)) == "UserItemPropagation(num_layers=3, combine='sum')"


@pytest.mark.skipif("torch_sparse" not in available_backends(), reason="torch-sparse not installed")
def test_sparse_tensor_backend_matches_csr():
    from cm3_pyg.data import make_synthetic
    from cm3_pyg.models import CM3
    from cm3_pyg.training import build_graph_inputs, load_config

    ui = random_bipartite(seed=3)
    index, weight = bipartite_normalized_adjacency(ui, 30, 20)
    x = torch.randn(50, 6, dtype=torch.float64)
    conv = UserItemPropagation(3)
    csr = to_adjacency(index, weight.double(), 50, backend="csr")
    st = to_adjacency(index, weight.double(), 50, backend="torch_sparse")
    torch.testing.assert_close(conv(x, st), conv(x, csr))

    dims = {"image": 8, "text": 6}
    data = make_synthetic(num_users=120, num_items=80, modality_dims=dims, seed=0)
    outs = {}
    for backend in ("csr", "torch_sparse"):
        config = load_config(CM3.default_config(), overrides={"sparse_backend": backend})
        inputs = build_graph_inputs(data, config)
        torch.manual_seed(0)
        model = CM3.from_config(config, inputs).eval()
        users, pos = data["user", "rates", "item"].edge_index[:, :64]
        loss = model.training_loss(inputs, users, pos, pos.flip(0))
        loss.backward()
        outs[backend] = (loss.detach(), model.user_embedding.grad.clone(), model.embed(inputs))
    torch.testing.assert_close(outs["csr"][0], outs["torch_sparse"][0])
    torch.testing.assert_close(outs["csr"][1], outs["torch_sparse"][1])
    torch.testing.assert_close(outs["csr"][2][1], outs["torch_sparse"][2][1])


def _directed(n=40, e=160, seed=4):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(n, (2, e), generator=g)
    weight = torch.rand(e, generator=g, dtype=torch.float64)
    return index, weight


@pytest.mark.parametrize("backend", available_backends())
def test_every_backend_matches_dense_forward_and_backward_on_a_directed_graph(backend):
    # Not symmetric, with duplicate entries (summed): the backward must use the transpose.
    index, weight = _directed()
    adj = to_adjacency(index, weight, 40, backend=backend)
    assert adj.backend == backend and not adj.symmetric
    a = dense(index, weight, 40)
    x = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(40, 5, dtype=torch.float64)
    out = spmm(adj, x)
    torch.testing.assert_close(out, a @ x)
    (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(grad, a.t() @ g)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("combine", ["sum", "mean", "last"])
@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_multi_layer_propagation_matches_dense_powers_and_their_transpose(
    backend, combine, num_layers
):
    # Directed (so the backward needs A^T) with duplicates; all layers in one call.
    index, weight = _directed(seed=7)
    adj = to_adjacency(index, weight, 40, backend=backend)
    a = dense(index, weight, 40)
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(40, 6, dtype=torch.float64)
    powers = [torch.eye(40, dtype=torch.float64)]
    for _ in range(num_layers):
        powers.append(a @ powers[-1])
    operator = {
        "sum": sum(powers),
        "mean": sum(powers) / (num_layers + 1),
        "last": powers[-1],
    }[combine]
    out = UserItemPropagation(num_layers, combine)(x, adj)
    torch.testing.assert_close(out, operator @ x.detach())
    (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(grad, operator.t() @ g)
    # the output never aliases the input (callers may modify it in place)
    assert out.data_ptr() != x.data_ptr()


def test_multi_layer_propagation_validates_its_arguments():
    index, weight = _directed()
    adj = to_adjacency(index, weight, 40)
    with pytest.raises(ValueError, match="combine"):
        adj.propagate(torch.zeros(40, 2, dtype=torch.float64), 2, "max")
    with pytest.raises(ValueError, match="cannot multiply x with 39 rows"):
        adj.propagate(torch.zeros(39, 2, dtype=torch.float64), 2)
    rect = to_adjacency(torch.tensor([[0, 1], [2, 0]]), torch.ones(2), 2, 3)
    with pytest.raises(ValueError, match="square"):
        rect.propagate(torch.zeros(3, 2), 1)


def test_rectangular_adjacency_and_shape_errors():
    index = torch.tensor([[0, 1, 2], [4, 0, 3]])
    weight = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    adj = to_adjacency(index, weight, 3, 5, backend="csr")
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    expected[index[0], index[1]] = weight
    torch.testing.assert_close(adj.to_dense(), expected)
    torch.testing.assert_close(adj @ x, expected @ x)
    with pytest.raises(ValueError, match="cannot multiply x with 3 rows"):
        adj @ torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="edge_weight must have shape"):
        to_adjacency(index, weight[:2], 3, 5)


def test_symmetric_graph_is_stored_once_and_dtype_conversion():
    ui = random_bipartite(seed=5)
    index, weight = bipartite_normalized_adjacency(ui, 30, 20)
    adj = to_adjacency(index, weight, 50, backend="csr")
    assert adj.symmetric
    as64 = adj.to(torch.float64)
    assert as64.value.dtype == torch.float64 and as64.backend == "csr"
    assert adj.to("cpu") is adj
    assert "symmetric=True" in repr(adj)


def test_auto_backend_is_chosen_by_measurement(monkeypatch):
    import cm3_pyg.nn.sparse as sparse
    from cm3_pyg.nn.sparse import choose_backend, measure_backends

    ui = random_bipartite(seed=6)
    index, weight = bipartite_normalized_adjacency(ui, 30, 20)
    adj = to_adjacency(index, weight, 50, backend="csr")
    times = measure_backends(adj, width=8, repeats=1)
    assert set(times) == set(available_backends())
    assert all(t > 0 for t in times.values())
    # small graphs take csr without measuring (reproducible); large ones are measured
    assert choose_backend(adj, width=8) == "csr"
    measured = []
    monkeypatch.setattr(sparse, "AUTO_MIN_NNZ", 0)
    monkeypatch.setattr(sparse, "_CHOICES", {})
    monkeypatch.setattr(
        sparse, "measure_backends", lambda a, w: measured.append(w) or {b: 1.0 for b in times}
    )
    assert choose_backend(adj, width=8) == "csr"  # a tie keeps csr
    assert measured == [8]
    if len(times) > 1:
        other = [b for b in times if b != "csr"][0]
        monkeypatch.setattr(sparse, "_CHOICES", {})
        monkeypatch.setattr(
            sparse, "measure_backends", lambda a, w: {b: 0.5 if b == other else 1.0 for b in times}
        )
        assert to_adjacency(index, weight, 50, backend="auto", width=8).backend == other


def test_out_of_range_indices_are_a_clear_error():
    index = torch.tensor([[0, 5], [1, 2]])
    with pytest.raises(ValueError, match=r"edge_index\[0\] has a row index outside \[0, 4\)"):
        to_adjacency(index, None, 4)
    with pytest.raises(ValueError, match=r"edge_index\[1\] has a column index outside \[0, 3\)"):
        to_adjacency(torch.tensor([[0, 1], [1, 3]]), None, 2, 3)


@pytest.mark.parametrize("combine", ["sum", "mean", "last"])
@pytest.mark.parametrize("num_layers", [0, 1, 2, 3])
@pytest.mark.parametrize("bipartite", [True, False])
def test_batch_rows_match_dense_layers_and_their_gradients(combine, num_layers, bipartite):
    # forward_rows: the batch users' rows and the item rows of the propagation, with the
    # gradient of any upstream use of them, against dense float64 powers. On a bipartite
    # graph the last layer is restricted to those rows; a graph with a user-user edge takes
    # the full path. Repeated and unsorted users, and users without edges, are allowed.
    nu, ni = 30, 20
    index, weight = bipartite_normalized_adjacency(random_bipartite(nu, ni, 90, seed=3), nu, ni)
    if not bipartite:
        index = torch.cat([index, torch.tensor([[0, 1], [1, 0]])], dim=1)
        weight = torch.cat([weight, torch.tensor([0.3, 0.3])])
    n = nu + ni
    adj = to_adjacency(index, weight.double(), n, backend="csr")
    assert (adj._bipartite_blocks(nu) is not None) == bipartite
    a = dense(index, weight, n)
    users = torch.tensor([7, 3, 7, 29, 0, 12])
    layer = UserItemPropagation(num_layers, combine)
    x = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    user_rows, item_rows = layer.forward_rows(x, adj, nu, users)

    y = x.detach().clone().requires_grad_()
    layers = [y]
    for _ in range(num_layers):
        layers.append(a @ layers[-1])
    full = {"sum": sum(layers), "mean": sum(layers) / (num_layers + 1), "last": layers[-1]}
    expected = full[combine]
    torch.testing.assert_close(user_rows, expected[users])
    torch.testing.assert_close(item_rows, expected[nu:])

    w_users, w_items = torch.randn_like(user_rows), torch.randn_like(item_rows)
    for use_users, use_items in [(True, True), (True, False), (False, True)]:
        ours = (user_rows * w_users).sum() * use_users + (item_rows * w_items).sum() * use_items
        theirs = (expected[users] * w_users).sum() * use_users + (
            expected[nu:] * w_items
        ).sum() * use_items
        (got,) = torch.autograd.grad(ours, x, retain_graph=True)
        (want,) = torch.autograd.grad(theirs, y, retain_graph=True)
        torch.testing.assert_close(got, want)


def test_batch_rows_of_an_edge_index_graph_and_a_torch_csr_tensor():
    nu, ni = 12, 8
    index, weight = bipartite_normalized_adjacency(random_bipartite(nu, ni, 40, seed=5), nu, ni)
    x = torch.randn(nu + ni, 4, dtype=torch.float64)
    users = torch.tensor([2, 11, 2])
    layer = UserItemPropagation(2)
    expected = layer(x, to_adjacency(index, weight.double(), nu + ni))
    csr = torch.sparse_coo_tensor(index, weight.double(), (nu + ni, nu + ni)).to_sparse_csr()
    for adj in (csr, to_adjacency(index, weight.double(), nu + ni, backend="edge_index")):
        user_rows, item_rows = layer.forward_rows(x, adj, nu, users)
        torch.testing.assert_close(user_rows, expected[users])
        torch.testing.assert_close(item_rows, expected[nu:])


def test_batch_rows_validate_the_user_ids():
    nu, ni = 6, 4
    index, weight = bipartite_normalized_adjacency(random_bipartite(nu, ni, 12, seed=1), nu, ni)
    adj = to_adjacency(index, weight, nu + ni)
    x = torch.randn(nu + ni, 3)
    with pytest.raises(ValueError, match=r"users must lie in \[0, 6\), got ids from 0 to 6"):
        adj.propagate_rows(x, 2, "sum", nu, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        adj.propagate_rows(x, 2, "sum", nu, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("backend", available_backends())
def test_adjacency_survives_torch_save(backend: str, symmetric: bool, tmp_path) -> None:
    """A saved and reloaded adjacency (e.g. inside cached GraphInputs) keeps its entries and
    rebuilds its kernel: the same product, forward and backward, as a dense float64 matrix."""
    gen = torch.Generator().manual_seed(3)
    n = 9
    edge_index = torch.randint(n, (2, 30), generator=gen)
    if symmetric:
        edge_index = torch.cat([edge_index, edge_index.flip(0)], dim=1)
    weight = torch.rand(edge_index.size(1), generator=gen, dtype=torch.float64)
    if symmetric:
        weight = torch.cat([weight[:30], weight[:30]])
    adj = to_adjacency(edge_index, weight, n, backend=backend)
    path = tmp_path / "adj.pt"
    torch.save(adj, path)
    loaded = torch.load(path, weights_only=False)
    assert (loaded.backend, loaded.shape, loaded.symmetric) == (
        adj.backend,
        adj.shape,
        adj.symmetric,
    )
    dense = torch.zeros(n, n, dtype=torch.float64).index_put_(
        (edge_index[0], edge_index[1]), weight, accumulate=True
    )
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    out = loaded @ x
    assert torch.allclose(out, dense @ x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(grad, dense.t() @ torch.ones(n, 4, dtype=torch.float64))
