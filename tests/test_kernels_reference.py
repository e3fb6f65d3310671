"""Every fast kernel against its plain-torch reference version, the dispatch policy, the
adjacency boundary, and a whole CM3 step with the kernels on and off.

The references (``cm3_pyg.nn.reference``) are themselves held to independent checks here
(hand-worked values, float64 brute force, gradcheck) and in test_fusion.py, test_losses.py,
test_numerics.py and test_propagation.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

from cm3_pyg.data import bipartite_normalized_adjacency, make_synthetic
from cm3_pyg.models import CM3
from cm3_pyg.nn import (
    ClampedCosineSimilarity,
    SparseAdjacency,
    UserItemPropagation,
    as_adjacency,
    calibrated_uniformity_loss,
    feature_linear,
    gaussian_nll,
    kernels_enabled,
    normalize_rows,
    reference,
    set_kernels,
    slerp,
    spmm,
    to_adjacency,
    uniformity_loss,
    use_reference_math,
)
from cm3_pyg.nn.kernels import WIDE_INPUT_FEATURES, use_kernel
from cm3_pyg.nn.kernels import gaussian as gaussian_kernel
from cm3_pyg.nn.kernels import pairwise as pairwise_kernel
from cm3_pyg.nn.kernels import rows as rows_kernel
from cm3_pyg.nn.kernels import slerp as slerp_kernel
from cm3_pyg.nn.sparse import available_backends
from cm3_pyg.training import build_graph_inputs, load_config

DOUBLE = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same_function(
    fast: Callable[..., torch.Tensor],
    slow: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    **tolerance: float,
) -> None:
    """Equal values, and equal gradients for every input that requires one, under a random
    upstream gradient."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    twins = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    got, want = fast(*leaves), slow(*twins)
    torch.testing.assert_close(got, want, **tolerance)
    needing = [i for i, x in enumerate(inputs) if x.requires_grad]
    if not needing:
        return
    upstream = torch.randn(got.shape, generator=_generator(99), dtype=got.dtype)
    ours = torch.autograd.grad(got, [leaves[i] for i in needing], upstream)
    theirs = torch.autograd.grad(want, [twins[i] for i in needing], upstream)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tolerance)


# ----------------------------------------------------------------------------- policy


def test_reference_switch_is_scoped_and_restored_on_error() -> None:
    x = torch.randn(4, 3)
    assert kernels_enabled() and use_kernel("normalize_rows", x)
    with use_reference_math():
        assert not kernels_enabled()
        assert not use_kernel("normalize_rows", x)
        assert "NormalizeRows" not in type(normalize_rows(x.requires_grad_()).grad_fn).__name__
    assert kernels_enabled()
    with pytest.raises(RuntimeError, match="inside"), use_reference_math():
        raise RuntimeError("inside")
    assert kernels_enabled()
    assert set_kernels(False) is True
    try:
        assert not kernels_enabled()
    finally:
        assert set_kernels(True) is False


def test_policy_conditions() -> None:
    rows = torch.zeros(3, 4)
    assert use_kernel("slerp", rows, t=torch.zeros(3, 1))
    assert not use_kernel("slerp", rows, t=torch.zeros(3, 1, requires_grad=True))
    assert not use_kernel("slerp", torch.zeros(4), t=torch.zeros(()))
    assert use_kernel("feature_linear", torch.zeros(2, WIDE_INPUT_FEATURES))
    assert not use_kernel("feature_linear", torch.zeros(2, WIDE_INPUT_FEATURES - 1))
    assert use_kernel("csr_layer_sum", rows, backend="csr")
    assert not use_kernel("csr_layer_sum", rows, backend="edge_index")
    assert use_kernel("csr_batch_rows", rows, backend="csr")
    assert use_kernel("sparse_product", rows, backend="edge_index")
    for kernel in ("pairwise_log_sum_exp", "info_nce", "gaussian_nll", "normalized_concat"):
        assert use_kernel(kernel, rows)


# ----------------------------------------------------------------------------- rows


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 4), (1, 1), (0, 3)])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_normalize_rows_kernel_equals_reference(shape: tuple[int, ...], scale: float) -> None:
    x = torch.randn(shape, generator=_generator(1), dtype=DOUBLE) * scale
    if x.numel() and x.dim() == 2 and x.size(0) > 1:
        x[1] = 0.0  # a zero row stays zero and passes its gradient through
    _same_function(rows_kernel.normalize_rows, reference.normalize_rows, [x.requires_grad_()])
    # float32 at extreme scales: both take their rescaled path and stay unit
    small = x.detach().float() * (1e8 if scale > 1 else 1e-8)
    torch.testing.assert_close(
        rows_kernel.normalize_rows(small), reference.normalize_rows(small), atol=1e-6, rtol=0
    )


def test_normalize_rows_reference_by_hand() -> None:
    x = torch.tensor([[3.0, 0.0, -4.0], [0.0, 0.0, 0.0], [1e30, 1e30, 0.0]])
    want = torch.tensor([[0.6, 0.0, -0.8], [0.0, 0.0, 0.0], [0.5**0.5, 0.5**0.5, 0.0]])
    torch.testing.assert_close(reference.normalize_rows(x), want)
    assert torch.autograd.gradcheck(
        reference.normalize_rows, (torch.randn(4, 3, dtype=DOUBLE, requires_grad=True),)
    )


@pytest.mark.parametrize("widths", [(3, 3), (2, 5, 1)])
def test_normalized_concat_kernel_equals_reference(widths: tuple[int, ...]) -> None:
    g = _generator(2)
    blocks = [
        [torch.randn(n, w, generator=g, dtype=DOUBLE).requires_grad_() for n in (3, 5)]
        for w in widths
    ]
    with torch.no_grad():
        blocks[0][1][2] = 0.0
        blocks[-1][0].mul_(1e200)
    flat = [b for group in blocks for b in group]
    row_sizes, shape = (3, 5), tuple(widths)

    def fast(*pieces: torch.Tensor) -> torch.Tensor:
        return rows_kernel.normalized_concat(row_sizes, shape, pieces)

    def slow(*pieces: torch.Tensor) -> torch.Tensor:
        it = iter(pieces)
        return reference.normalized_concat([[next(it), next(it)] for _ in widths])

    _same_function(fast, slow, flat)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_feature_linear_kernel_equals_reference(with_bias: bool, input_grad: bool) -> None:
    g = _generator(3)
    x = torch.randn(9, WIDE_INPUT_FEATURES, generator=g, dtype=DOUBLE).requires_grad_(input_grad)
    w = torch.randn(4, WIDE_INPUT_FEATURES, generator=g, dtype=DOUBLE).requires_grad_()
    inputs = [x, w]
    if with_bias:
        inputs.append(torch.randn(4, generator=g, dtype=DOUBLE).requires_grad_())

    def fast(*args: torch.Tensor) -> torch.Tensor:
        return rows_kernel.feature_linear(args[0], args[1], args[2] if with_bias else None)

    def slow(*args: torch.Tensor) -> torch.Tensor:
        return reference.feature_linear(args[0], args[1], args[2] if with_bias else None)

    _same_function(fast, slow, inputs)
    out = feature_linear(x, w)
    assert "FeatureLinear" in type(out.grad_fn).__name__
    with use_reference_math():
        assert "FeatureLinear" not in type(feature_linear(x, w).grad_fn).__name__


# ----------------------------------------------------------------------------- slerp


def _slerp_rows(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows on every branch of slerp: near, far with a plane, identical, antipodal (the
    fallback axis), zero rows on either side or both, non-unit rows; t in [0, 1]."""
    g = _generator(11)
    a = F.normalize(torch.randn(13, 6, generator=g, dtype=DOUBLE), dim=-1)
    b = F.normalize(torch.randn(13, 6, generator=g, dtype=DOUBLE), dim=-1)
    b[0] = a[0]
    b[1] = -a[1]
    b[2] = F.normalize(-a[2] + 0.3 * b[2], dim=-1)
    b[3] = F.normalize(a[3] + 0.2 * b[3], dim=-1)
    a[4] = 0.0
    b[5] = 0.0
    a[6], b[6] = 0.0, 0.0
    a[7], b[7] = 1.7 * a[7], 0.6 * b[7]
    a[8] = 0.9 * a[8]
    b[8] = -a[8] / 0.9
    t = torch.rand(13, 1, generator=g, dtype=DOUBLE)
    t[9], t[10] = 0.0, 1.0
    return a.to(dtype), b.to(dtype), t.to(dtype)


def test_slerp_kernel_equals_reference_on_every_branch() -> None:
    a, b, t = _slerp_rows(DOUBLE)
    _same_function(
        lambda p, q: slerp_kernel.slerp(p, q, t),
        lambda p, q: reference.slerp(p, q, t),
        [a.requires_grad_(), b.requires_grad_()],
    )


def test_slerp_kernel_equals_reference_in_float32() -> None:
    a, b, t = _slerp_rows(torch.float32)
    _same_function(
        lambda p, q: slerp_kernel.slerp(p, q, t),
        lambda p, q: reference.slerp(p, q, t),
        [a.requires_grad_(), b.requires_grad_()],
        atol=2e-4,
        rtol=1e-4,
    )


def test_slerp_reference_formula_and_gradcheck() -> None:
    # Away from 0 and pi the reference is the textbook acos formula; its gradient, t's
    # included, passes gradcheck on near and far rows.
    g = _generator(12)
    a = F.normalize(torch.randn(8, 4, generator=g, dtype=DOUBLE), dim=-1)
    b = F.normalize(torch.randn(8, 4, generator=g, dtype=DOUBLE), dim=-1)
    b[:3] = F.normalize(-a[:3] + 0.2 * b[:3], dim=-1)
    t = torch.rand(8, 1, generator=g, dtype=DOUBLE)
    theta = torch.acos((a * b).sum(-1, keepdim=True))
    textbook = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    torch.testing.assert_close(reference.slerp(a, b, t), textbook)
    assert torch.autograd.gradcheck(
        reference.slerp, (a.requires_grad_(), b.requires_grad_(), t.requires_grad_())
    )


def test_slerp_dispatch_follows_the_policy() -> None:
    a, b, t = _slerp_rows(DOUBLE)
    a.requires_grad_()
    assert "Slerp" in type(slerp(a, b, t).grad_fn).__name__
    assert "Slerp" not in type(slerp(a, b, t.clone().requires_grad_()).grad_fn).__name__
    with use_reference_math():
        assert "Slerp" not in type(slerp(a, b, t).grad_fn).__name__
    # one row as a 1-D vector takes the reference
    torch.testing.assert_close(slerp(a[3], b[3], t[3]), slerp(a[3:4], b[3:4], t[3:4])[0])


# ----------------------------------------------------------------------------- pairwise


def _pairwise_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _generator(20 + n)
    x = F.normalize(torch.randn(n, 5, generator=g, dtype=DOUBLE), dim=-1)
    features = torch.randn(n, 4, generator=g, dtype=DOUBLE) * 3
    sim = torch.rand(n, n, generator=g, dtype=DOUBLE)
    counts = torch.randint(1, 4, (n,), generator=g)
    return x, features, sim, counts


@pytest.mark.parametrize("n", [1, 2, 9])
@pytest.mark.parametrize("with_counts", [False, True])
@pytest.mark.parametrize("tile_rows", [4, 512])
def test_uniformity_losses_kernel_equals_reference(
    monkeypatch: pytest.MonkeyPatch, n: int, with_counts: bool, tile_rows: int
) -> None:
    monkeypatch.setattr(pairwise_kernel, "TILE_ROWS", tile_rows)
    x, features, sim, counts = _pairwise_inputs(n)
    c = counts if with_counts else None
    inputs = [x.requires_grad_(), features.requires_grad_(), sim.requires_grad_()]

    def both(
        unif: Callable[..., torch.Tensor], cu: Callable[..., torch.Tensor]
    ) -> Callable[..., torch.Tensor]:
        def loss(y: torch.Tensor, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return (
                unif(y, 2.0, counts=c)
                + 0.5 * cu(y, ClampedCosineSimilarity(f, 0.0, 0.8), 1.5, counts=c)
                + cu(y, ClampedCosineSimilarity(f), 2.0, counts=c)
                + cu(y, s, 2.0, counts=c)
            )

        return loss

    _same_function(
        both(uniformity_loss, calibrated_uniformity_loss),
        both(reference.uniformity_loss, reference.calibrated_uniformity_loss),
        inputs,
    )


def test_uniformity_kernel_equals_reference_far_apart_rows() -> None:
    # The precomputed shift underflows here: the kernel falls back to the exact maximum.
    x = (torch.eye(6, dtype=DOUBLE) * 1e4).requires_grad_()
    _same_function(uniformity_loss, reference.uniformity_loss, [x])
    assert float(reference.uniformity_loss(x.detach())) == pytest.approx(-4e8, rel=1e-12)


def test_uniformity_reference_by_hand() -> None:
    # Two rows at squared distance 2 (orthogonal unit rows): log e^{-2t}; a row seen
    # twice adds a pair at distance 0 per ordered copy.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DOUBLE)
    assert float(reference.uniformity_loss(x, 2.0)) == pytest.approx(-4.0)
    # counts [2, 1]: ordered pairs 2*1*2 at distance 2, 2*1 at 0, out of 3*2 = 6
    want = math.log((4 * math.exp(-4.0) + 2) / 6)
    got = reference.uniformity_loss(x, 2.0, counts=torch.tensor([2, 1]))
    assert float(got) == pytest.approx(want)
    sim = torch.full((2, 2), 0.25, dtype=DOUBLE)
    assert float(reference.calibrated_uniformity_loss(x, sim)) == pytest.approx(-4 + 4 * 0.75)
    assert float(reference.uniformity_loss(x[:1])) == 0.0


@pytest.mark.parametrize("block_rows", [1, 7, 1024])
@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_info_nce_kernel_equals_reference(block_rows: int, temperature: float) -> None:
    g = _generator(5)
    a = F.normalize(torch.randn(30, 6, generator=g, dtype=DOUBLE), dim=-1).requires_grad_()
    o = F.normalize(torch.randn(30, 6, generator=g, dtype=DOUBLE), dim=-1).requires_grad_()
    _same_function(
        lambda p, q: pairwise_kernel.info_nce(p / temperature, q, block_rows),
        lambda p, q: reference.info_nce_loss(p, q, temperature),
        [a, o],
    )
    # the reference is -log softmax on the diagonal
    want = -torch.log_softmax(a @ o.t() / temperature, dim=1).diagonal().mean()
    torch.testing.assert_close(reference.info_nce_loss(a, o, temperature), want)


# ----------------------------------------------------------------------------- gaussian


def test_gaussian_nll_kernel_equals_reference() -> None:
    g = _generator(6)
    mu, logvar, y = (torch.randn(7, 5, generator=g, dtype=DOUBLE) for _ in range(3))
    weight = torch.rand(7, generator=g, dtype=DOUBLE)
    _same_function(
        lambda m, v, t: gaussian_kernel.gaussian_nll(m, v, t, weight),
        lambda m, v, t: reference.gaussian_nll(m, v, t, weight),
        [mu.requires_grad_(), logvar.requires_grad_(), y.requires_grad_()],
    )
    # one entry by hand: 0.5 * ((1 - 3)^2 e^{-log 2} + log 2) = 1 + 0.5 log 2
    one = torch.ones(1, 1, dtype=DOUBLE)
    got = reference.gaussian_nll(one, one * math.log(2), one * 3, torch.ones(1, dtype=DOUBLE))
    assert float(got) == pytest.approx(1 + 0.5 * math.log(2))
    assert float(gaussian_nll(one, one * math.log(2), one * 3, torch.ones(1, dtype=DOUBLE))) == (
        pytest.approx(1 + 0.5 * math.log(2))
    )


# ----------------------------------------------------------------------------- sparse


def _directed_adjacency(backend: str) -> tuple[SparseAdjacency, torch.Tensor]:
    g = _generator(7)
    index = torch.randint(30, (2, 120), generator=g)  # duplicates, not symmetric
    weight = torch.rand(120, generator=g, dtype=DOUBLE)
    adj = to_adjacency(index, weight, 30, backend=backend)
    dense = torch.zeros(30, 30, dtype=DOUBLE)
    dense.index_put_((index[0], index[1]), weight, accumulate=True)
    return adj, dense


@pytest.mark.parametrize("backend", available_backends())
def test_sparse_product_kernel_equals_reference_and_dense(backend: str) -> None:
    adj, dense = _directed_adjacency(backend)
    x = torch.randn(30, 4, generator=_generator(8), dtype=DOUBLE).requires_grad_()
    _same_function(adj.matmul, lambda h: reference.sparse_matmul(adj, h), [x])
    torch.testing.assert_close(reference.sparse_matmul(adj, x), dense @ x)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("combine", ["sum", "mean", "last"])
@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_propagation_kernel_equals_reference(backend: str, combine: str, num_layers: int) -> None:
    adj, dense = _directed_adjacency(backend)
    x = torch.randn(30, 4, generator=_generator(9), dtype=DOUBLE).requires_grad_()
    _same_function(
        lambda h: adj.propagate(h, num_layers, combine),
        lambda h: reference.propagate(adj, h, num_layers, combine),
        [x],
    )
    out = reference.propagate(adj, x, num_layers, combine)
    assert out.data_ptr() != x.data_ptr()
    powers = [x]
    for _ in range(num_layers):
        powers.append(dense @ powers[-1])
    want = {"sum": sum(powers), "mean": sum(powers) / (num_layers + 1), "last": powers[-1]}
    torch.testing.assert_close(out, want[combine])


@pytest.mark.parametrize("combine", ["sum", "mean", "last"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_batch_rows_kernel_equals_reference(combine: str, num_layers: int) -> None:
    nu, ni = 15, 10
    g = _generator(10)
    edges = torch.stack(
        [torch.randint(nu, (50,), generator=g), torch.randint(ni, (50,), generator=g)]
    )
    index, weight = bipartite_normalized_adjacency(edges, nu, ni)
    adj = to_adjacency(index, weight.double(), nu + ni, backend="csr")
    assert adj._bipartite_blocks(nu) is not None  # the restricted kernel applies
    users = torch.tensor([4, 0, 4, 14, 9])
    x = torch.randn(nu + ni, 3, generator=g, dtype=DOUBLE).requires_grad_()

    def joined(rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.cat(rows)

    _same_function(
        lambda h: joined(adj.propagate_rows(h, num_layers, combine, nu, users)),
        lambda h: joined(reference.propagate_rows(adj, h, num_layers, combine, nu, users)),
        [x],
    )


def test_as_adjacency_converts_at_the_boundary_and_rejects_the_rest() -> None:
    adj, dense = _directed_adjacency("csr")
    x = torch.randn(30, 2, dtype=DOUBLE)
    coo = dense.to_sparse()
    for raw in (coo, coo.to_sparse_csr()):
        converted = as_adjacency(raw, "adj_t")
        assert isinstance(converted, SparseAdjacency) and converted.backend == "csr"
        assert converted.shape == (30, 30) and converted.nnz == adj.nnz
        torch.testing.assert_close(spmm(raw, x), dense @ x)
        torch.testing.assert_close(UserItemPropagation(2)(x, raw), adj.propagate(x, 2))
    assert as_adjacency(adj) is adj
    with pytest.raises(TypeError, match=r"item_adj: expected a sparse adjacency .* dense"):
        as_adjacency(dense, "item_adj")
    with pytest.raises(TypeError, match=r"adj_t: expected a sparse adjacency .* got list"):
        as_adjacency([[0, 1]], "adj_t")
    from torch_geometric import EdgeIndex

    with pytest.raises(TypeError, match="EdgeIndex"):
        as_adjacency(EdgeIndex(torch.tensor([[0, 1], [1, 0]]), sparse_size=(2, 2)), "adj")


@pytest.mark.skipif("torch_sparse" not in available_backends(), reason="torch-sparse not installed")
def test_as_adjacency_converts_a_sparse_tensor() -> None:
    from torch_sparse import SparseTensor

    adj, dense = _directed_adjacency("csr")
    tensor = SparseTensor.from_dense(dense)
    converted = as_adjacency(tensor)
    assert converted.backend == "torch_sparse" and converted.nnz == adj.nnz
    x = torch.randn(30, 2, dtype=DOUBLE)
    torch.testing.assert_close(spmm(tensor, x), dense @ x)


# ----------------------------------------------------------------------------- CM3


def _cm3_step(reference_math: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    # A wide image table so that feature_linear's kernel is on the path too.
    dims = {"image": WIDE_INPUT_FEATURES, "text": 12}
    data = make_synthetic(num_users=60, num_items=40, modality_dims=dims, seed=0)
    config = load_config(CM3.default_config())
    inputs = build_graph_inputs(data, config)
    torch.manual_seed(0)
    model = CM3.from_config(config, inputs)
    users, pos = data["user", "rates", "item"].edge_index[:, :48]
    neg = torch.randint(inputs.num_items, users.shape, generator=_generator(1))
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)  # the fusion's draw of t
    if reference_math:
        with use_reference_math():
            loss = model.training_loss(inputs, users, pos, neg)
            grads = list(torch.autograd.grad(loss, params))
            model.eval()
            item = model.embed(inputs)[1]
    else:
        loss = model.training_loss(inputs, users, pos, neg)
        grads = list(torch.autograd.grad(loss, params))
        model.eval()
        item = model.embed(inputs)[1]
    return loss.detach(), grads, item


def test_cm3_step_is_the_same_with_the_reference_math() -> None:
    fast_loss, fast_grads, fast_item = _cm3_step(False)
    slow_loss, slow_grads, slow_item = _cm3_step(True)
    torch.testing.assert_close(fast_loss, slow_loss)
    torch.testing.assert_close(fast_item, slow_item)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b)
