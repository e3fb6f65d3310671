"""Tests for cm3_pyg.data.graphs and cm3_pyg.data.transforms (item k-NN, user-item graph)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import HeteroData

from cm3_pyg.data.graphs import (
    bipartite_normalized_adjacency,
    combine_weighted,
    cosine_topk,
    default_block_size,
    knn_normalized_adjacency,
    modality_weights,
)
from cm3_pyg.data.transforms import ModalityKNNGraph
from cm3_pyg.errors import ConfigError, DataFormatError


def _dense(edge_index: torch.Tensor, edge_weight: torch.Tensor, n: int) -> np.ndarray:
    """Dense float64 matrix of a COO graph (duplicates summed)."""
    out = np.zeros((n, n), dtype=np.float64)
    np.add.at(
        out,
        (edge_index[0].numpy(), edge_index[1].numpy()),
        edge_weight.double().numpy(),
    )
    return out


def _brute_topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense float64 cosine similarity + per-row top-k (descending)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, idx, axis=1), idx


def _assert_sorted_unique(edge_index: torch.Tensor, n: int) -> None:
    key = edge_index[0] * n + edge_index[1]
    assert bool((key[1:] > key[:-1]).all()), "edges must be sorted by (row, col) and unique"


# ----------------------------------------------------------------------------- cosine_topk


@pytest.mark.parametrize("block_size", [1, 7, 53, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_topk_matches_dense_bruteforce(block_size: int | None, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, k = 53, 6, 5
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    ref_vals, ref_idx = _brute_topk(x.numpy(), k)
    # the data must be tie-free at the top-k boundary for the set comparison to be exact
    full = np.sort(
        (x / x.norm(dim=1, keepdim=True)).numpy() @ (x / x.norm(dim=1, keepdim=True)).numpy().T,
        axis=1,
    )[:, ::-1]
    assert np.min(full[:, k - 1] - full[:, k]) > 1e-5

    vals, idx = cosine_topk(x.to(dtype), k, block_size=block_size)
    assert vals.shape == (n, k) and idx.shape == (n, k)
    assert vals.dtype == torch.float32 and idx.dtype == torch.long
    for i in range(n):
        assert set(idx[i].tolist()) == set(ref_idx[i].tolist())
    np.testing.assert_allclose(vals.double().numpy(), ref_vals, atol=1e-6)
    assert bool((vals[:, 1:] <= vals[:, :-1]).all()), "values must be descending"


def test_cosine_topk_self_included_and_first_for_distinct_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=gen)
    vals, idx = cosine_topk(x, 3, block_size=7)
    assert torch.equal(idx[:, 0], torch.arange(40))
    torch.testing.assert_close(vals[:, 0], torch.ones(40), atol=1e-6, rtol=0)


def test_cosine_topk_block_size_does_not_change_result() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 5, generator=gen)
    _, ref = cosine_topk(x, 4, block_size=64)
    for bs in (1, 5, 17, 1000):
        _, idx = cosine_topk(x, 4, block_size=bs)
        assert torch.equal(idx.sort(dim=1).values, ref.sort(dim=1).values)
    _, again = cosine_topk(x, 4, block_size=5)
    assert torch.equal(again, cosine_topk(x, 4, block_size=5)[1]), "deterministic"


def test_cosine_topk_of_some_rows_is_those_rows_of_the_full_search() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 6, generator=gen)
    values, indices = cosine_topk(x, 5, block_size=4)
    # rows on block boundaries (multiples of 4, or the end): the full call's products
    for rows in ((0, 37), (0, 12), (12, 24), (24, 37), (36, 37)):
        part_values, part_indices = cosine_topk(x, 5, block_size=4, rows=rows)
        assert torch.equal(part_values, values[rows[0] : rows[1]])
        assert torch.equal(part_indices, indices[rows[0] : rows[1]])
    # anywhere else: the same neighbours, similarities up to rounding
    for rows in ((3, 17), (10, 23)):
        for block_size in (1, 5, 100):
            part_values, part_indices = cosine_topk(x, 5, block_size=block_size, rows=rows)
            torch.testing.assert_close(part_values, values[rows[0] : rows[1]])
            assert torch.equal(part_indices, indices[rows[0] : rows[1]])
    empty_values, empty_indices = cosine_topk(x, 5, rows=(37, 37))
    assert empty_values.shape == (0, 5) and empty_indices.shape == (0, 5)
    for bad in ((-1, 3), (4, 2), (0, 38), (0.0, 3), (True, 3)):
        with pytest.raises(ValueError, match=r"rows must be \(start, stop\) with 0 <= start"):
            cosine_topk(x, 5, rows=bad)  # type: ignore[arg-type]


def test_cosine_topk_zero_rows_and_extreme_scales_are_finite() -> None:
    x = torch.tensor(
        [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1e-30, 1e-30, 0.0], [1e30, 0.0, 1e30]]
    )
    vals, idx = cosine_topk(x, 5, block_size=2)
    assert bool(torch.isfinite(vals).all())
    # the zero row has similarity 0 with everything
    row0 = dict(zip(idx[0].tolist(), vals[0].tolist(), strict=True))
    assert all(v == 0.0 for v in row0.values())
    # tiny and huge rows are still normalised correctly (no under/overflow)
    assert idx[3, 0] == 3 and abs(float(vals[3, 0]) - 1.0) < 1e-6
    assert idx[4, 0] == 4 and abs(float(vals[4, 0]) - 1.0) < 1e-6


def test_cosine_topk_rejects_bad_input() -> None:
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="k must be"):
        cosine_topk(x, 6)
    with pytest.raises(ValueError, match="k must be"):
        cosine_topk(x, 0)
    with pytest.raises(ValueError, match="2-D"):
        cosine_topk(x[0], 1)
    with pytest.raises(ValueError, match="block_size"):
        cosine_topk(x, 2, block_size=0)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="row 2"):
        cosine_topk(bad, 2)


def test_default_block_size_budget() -> None:
    assert default_block_size(10) == 10
    n = 1_000_000
    bs = default_block_size(n)
    assert bs >= 1 and bs * n * 4 <= 256 * 1024 * 1024
    assert default_block_size(10**12) == 1


def test_cosine_topk_never_allocates_n_by_n(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record every matrix product's output shape: none may exceed [block, N]."""
    shapes: list[tuple[int, ...]] = []
    real_mm, real_matmul = torch.mm, torch.matmul
    real_dunder = torch.Tensor.__matmul__

    def mm(a, b, *args, **kwargs):
        out = real_mm(a, b, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    def matmul(a, b, *args, **kwargs):
        out = real_matmul(a, b, *args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    def dunder(a, b):
        out = real_dunder(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "matmul", matmul)
    monkeypatch.setattr(torch.Tensor, "__matmul__", dunder)

    n, d, block = 20000, 8, 256
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(3))
    vals, idx = cosine_topk(x, 10, block_size=block)
    assert shapes, "the block product was not observed"
    assert max(s[0] * s[1] for s in shapes) <= block * n
    assert all(s[0] <= block for s in shapes)
    assert idx.shape == (n, 10)
    assert torch.equal(idx[:, 0], torch.arange(n))


# ----------------------------------------------------------------- knn normalisation


def test_knn_normalized_adjacency_matches_dense_row_degree_normalisation() -> None:
    gen = torch.Generator().manual_seed(4)
    n, k = 30, 4
    _, idx = cosine_topk(torch.randn(n, 5, generator=gen), k)
    edge_index, edge_weight = knn_normalized_adjacency(idx, n)
    assert edge_index.shape == (2, n * k) and edge_weight.shape == (n * k,)
    assert edge_weight.dtype == torch.float32
    _assert_sorted_unique(edge_index, n)

    a = np.zeros((n, n))
    a[np.repeat(np.arange(n), k), idx.numpy().reshape(-1)] = 1.0
    d = a.sum(axis=1)  # row (out-)degree, as the reference
    expected = np.diag(d**-0.5) @ a @ np.diag(d**-0.5)
    np.testing.assert_allclose(_dense(edge_index, edge_weight, n), expected, atol=1e-7)
    np.testing.assert_allclose(edge_weight.numpy(), 1.0 / k, rtol=1e-6)
    # directed: the out-degree of every node is exactly k
    assert torch.equal(torch.bincount(edge_index[0], minlength=n), torch.full((n,), k))


def test_knn_normalized_adjacency_rejects_bad_indices() -> None:
    with pytest.raises(ValueError, match="repeats"):
        knn_normalized_adjacency(torch.tensor([[0, 1], [1, 1]]), 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        knn_normalized_adjacency(torch.tensor([[0, 2], [1, 0]]), 2)
    with pytest.raises(ValueError, match="num_nodes"):
        knn_normalized_adjacency(torch.tensor([[0], [1]]), 3)


# ------------------------------------------------------------------- combine_weighted


def test_combine_weighted_matches_dense_weighted_sum() -> None:
    gen = torch.Generator().manual_seed(5)
    n = 25
    graphs = []
    for seed in range(3):
        _, idx = cosine_topk(torch.randn(n, 4, generator=gen), 3 + seed)
        graphs.append(knn_normalized_adjacency(idx, n))
    weights = [0.2, 0.5, 0.3]
    edge_index, edge_weight = combine_weighted(graphs, weights, n)
    _assert_sorted_unique(edge_index, n)
    expected = sum(w * _dense(ei, ew, n) for (ei, ew), w in zip(graphs, weights, strict=True))
    np.testing.assert_allclose(_dense(edge_index, edge_weight, n), expected, atol=1e-7)
    # every self loop is in all three graphs, so it was summed into one edge
    loops = edge_index[0] == edge_index[1]
    assert int(loops.sum()) == n

    single = combine_weighted(graphs[:1], [1.0], n)
    assert torch.equal(single[0], graphs[0][0]) and torch.equal(single[1], graphs[0][1])
    with pytest.raises(ValueError):
        combine_weighted(graphs, [1.0], n)
    with pytest.raises(ValueError):
        combine_weighted([], [], n)


# ------------------------------------------------------------------- modality_weights


def test_modality_weights_rules() -> None:
    assert modality_weights(["image", "text"], mm_image_weight=0.1) == pytest.approx([0.1, 0.9])
    assert modality_weights(["text", "image"], mm_image_weight=0.1) == pytest.approx([0.9, 0.1])
    assert modality_weights(["image", "text"]) == pytest.approx([0.5, 0.5])
    assert modality_weights(["audio", "text"], mm_image_weight=0.1) == pytest.approx([0.5, 0.5])
    three = modality_weights(["image", "text", "audio"], mm_image_weight=0.1)
    assert three == pytest.approx([1 / 3] * 3)
    assert modality_weights(["text"], mm_image_weight=0.1) == pytest.approx([1.0])
    # an explicit map wins and is normalised
    explicit = modality_weights(["image", "text"], {"text": 3.0, "image": 1.0}, 0.1)
    assert explicit == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize(
    ("weights", "mm_image_weight", "match"),
    [
        ({"image": 1.0}, None, "'text'"),
        ({"image": 1.0, "text": 1.0, "audio": 1.0}, None, "'audio'"),
        ({"image": -0.1, "text": 1.0}, None, "'image'"),
        ({"image": float("nan"), "text": 1.0}, None, "'image'"),
        ({"image": "x", "text": 1.0}, None, "'image'"),
        ({"image": 0.0, "text": 0.0}, None, "zero"),
        (None, 1.5, "mm_image_weight"),
    ],
)
def test_modality_weights_errors(weights, mm_image_weight, match) -> None:
    with pytest.raises(ConfigError, match=match):
        modality_weights(["image", "text"], weights, mm_image_weight)
    assert issubclass(ConfigError, ValueError)


def test_modality_weights_bad_modalities() -> None:
    with pytest.raises(ValueError):
        modality_weights([])
    with pytest.raises(ValueError):
        modality_weights(["text", "text"])


# ------------------------------------------------------------- bipartite adjacency


def test_bipartite_normalized_adjacency_matches_independent_dense() -> None:
    num_users, num_items = 6, 5
    # duplicates (0,1) twice, user 3 and 5 isolated, item 4 isolated
    pairs = [(0, 1), (0, 1), (0, 2), (1, 0), (1, 1), (2, 3), (4, 0), (4, 1), (4, 2), (4, 3)]
    edge_index = torch.tensor(pairs, dtype=torch.long).t()
    out_index, out_weight = bipartite_normalized_adjacency(edge_index, num_users, num_items)

    n = num_users + num_items
    a = np.zeros((n, n))
    for u, i in pairs:
        a[u, num_users + i] = 1.0
        a[num_users + i, u] = 1.0
    deg = a.sum(axis=1)
    inv = np.zeros(n)
    inv[deg > 0] = deg[deg > 0] ** -0.5
    expected = inv[:, None] * a * inv[None, :]

    unique = len(set(pairs))
    assert out_index.shape == (2, 2 * unique) and out_weight.shape == (2 * unique,)
    assert out_weight.dtype == torch.float32
    assert bool(torch.isfinite(out_weight).all())
    _assert_sorted_unique(out_index, n)
    dense = _dense(out_index, out_weight, n)
    np.testing.assert_allclose(dense, expected, atol=1e-7)
    np.testing.assert_allclose(dense, dense.T, atol=0)
    assert not bool((out_index[0] == out_index[1]).any())
    isolated = [3, 5, num_users + 4]
    assert not bool(torch.isin(out_index, torch.tensor(isolated)).any())


def test_bipartite_normalized_adjacency_empty_and_errors() -> None:
    ei, ew = bipartite_normalized_adjacency(torch.empty(2, 0, dtype=torch.long), 3, 2)
    assert ei.shape == (2, 0) and ew.shape == (0,)
    with pytest.raises(ValueError, match="user ids"):
        bipartite_normalized_adjacency(torch.tensor([[3], [0]]), 3, 2)
    with pytest.raises(ValueError, match="item ids"):
        bipartite_normalized_adjacency(torch.tensor([[0], [2]]), 3, 2)
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        bipartite_normalized_adjacency(torch.tensor([0, 1]), 3, 2)


# ------------------------------------------------------------------ ModalityKNNGraph


def _tiny_data(num_items: int = 12) -> HeteroData:
    gen = torch.Generator().manual_seed(6)
    data = HeteroData()
    data["user"].num_nodes = 4
    data["item"].num_nodes = num_items
    data["item"].x_image = torch.randn(num_items, 5, generator=gen)
    data["item"].x_text = torch.randn(num_items, 7, generator=gen)
    data["user", "rates", "item"].edge_index = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    data.modalities = ["image", "text"]
    return data


def test_modality_knn_graph_adds_expected_graphs() -> None:
    data = _tiny_data()
    n, k = 12, 3
    out = ModalityKNNGraph(k=k, mm_image_weight=0.1, block_size=5)(data)
    for rel in ("image_knn", "text_knn", "mm_knn"):
        assert ("item", rel, "item") in out.edge_types
    # the input object is not modified (BaseTransform shallow-copies)
    assert ("item", "mm_knn", "item") not in data.edge_types

    dense = {}
    for m in ("image", "text"):
        store = out["item", f"{m}_knn", "item"]
        assert store.edge_index.shape == (2, k * n) and store.edge_weight.shape == (k * n,)
        _, idx = cosine_topk(out["item"][f"x_{m}"], k)
        ref = knn_normalized_adjacency(idx, n)
        assert torch.equal(store.edge_index, ref[0])
        dense[m] = _dense(store.edge_index, store.edge_weight, n)
    mm = out["item", "mm_knn", "item"]
    np.testing.assert_allclose(
        _dense(mm.edge_index, mm.edge_weight, n),
        0.1 * dense["image"] + 0.9 * dense["text"],
        atol=1e-7,
    )


def test_modality_knn_graph_single_modality_and_explicit_weights() -> None:
    data = _tiny_data()
    data.modalities = ["text"]
    out = ModalityKNNGraph(k=2)(data)
    assert ("item", "image_knn", "item") not in out.edge_types
    assert torch.equal(
        out["item", "mm_knn", "item"].edge_index, out["item", "text_knn", "item"].edge_index
    )
    assert torch.equal(
        out["item", "mm_knn", "item"].edge_weight, out["item", "text_knn", "item"].edge_weight
    )

    data = _tiny_data()
    out = ModalityKNNGraph(k=2, weights={"image": 1.0, "text": 1.0})(data)
    mm = out["item", "mm_knn", "item"]
    img, txt = out["item", "image_knn", "item"], out["item", "text_knn", "item"]
    expected = 0.5 * _dense(img.edge_index, img.edge_weight, 12)
    expected += 0.5 * _dense(txt.edge_index, txt.edge_weight, 12)
    np.testing.assert_allclose(_dense(mm.edge_index, mm.edge_weight, 12), expected, atol=1e-7)


def test_modality_knn_graph_errors_and_repr() -> None:
    data = _tiny_data()
    del data["item"].x_text
    with pytest.raises(DataFormatError, match="x_text"):
        ModalityKNNGraph(k=2)(data)

    data = _tiny_data()
    del data.modalities
    with pytest.raises(DataFormatError, match="modalities"):
        ModalityKNNGraph(k=2)(data)

    data = _tiny_data()
    data["item"].x_text = torch.randn(11, 3)
    with pytest.raises(DataFormatError, match="11 rows"):
        ModalityKNNGraph(k=2)(data)

    with pytest.raises(ConfigError, match="exceeds"):
        ModalityKNNGraph(k=50)(_tiny_data())
    with pytest.raises(ConfigError, match="'text'"):
        ModalityKNNGraph(k=2, weights={"image": 1.0})(_tiny_data())
    with pytest.raises(ConfigError):
        ModalityKNNGraph(k=0)

    text = repr(ModalityKNNGraph(k=7, weights={"image": 0.3, "text": 0.7}))
    assert text.startswith("ModalityKNNGraph(") and "k=7" in text and "'image': 0.3" in text
