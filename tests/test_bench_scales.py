"""The benchmark datasets of ``benchmarks/scales.py``: Elec-scale synthetic and real Amazon."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import HeteroData

from benchmarks.scales import (
    SMALL_SCALE,
    amazon_with_generated_features,
    elec_scale,
    generated_features,
    scale_interactions,
)
from cm3_pyg.data.hetero import ITEM, RATED_BY, RATES, SPLIT_ATTRS, USER, build_hetero_data
from cm3_pyg.data.synthetic import write_mmrec_folder

N_USERS, N_ITEMS, N_ROWS = (
    SMALL_SCALE.num_users,
    SMALL_SCALE.num_items,
    SMALL_SCALE.num_interactions,
)


@pytest.fixture(scope="module")
def small() -> HeteroData:
    return elec_scale(0, **asdict(SMALL_SCALE))


def _rows(data: HeteroData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(users, items, labels)`` over all three splits."""
    parts = [data[RATES][SPLIT_ATTRS[s]].numpy() for s in ("train", "valid", "test")]
    labels = np.concatenate([np.full(p.shape[1], k) for k, p in enumerate(parts)])
    edges = np.concatenate(parts, axis=1)
    return edges[0], edges[1], labels


def _assert_same(a: HeteroData, b: HeteroData) -> None:
    assert a.modalities == b.modalities
    assert set(a.node_types) == set(b.node_types) and set(a.edge_types) == set(b.edge_types)
    for key in [*a.node_types, *a.edge_types]:
        assert set(a[key].keys()) == set(b[key].keys()), key
        for attr, x in a[key].items():
            y = b[key][attr]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), (key, attr)
            else:
                assert x == y, (key, attr)


def test_small_scale_exact_counts_and_cores(small: HeteroData) -> None:
    assert small[USER].num_nodes == N_USERS and small[ITEM].num_nodes == N_ITEMS
    users, items, _ = _rows(small)
    assert users.shape[0] == N_ROWS
    # No (user, item) pair repeats, even across splits.
    assert np.unique(users * N_ITEMS + items).shape[0] == N_ROWS
    assert np.bincount(users, minlength=N_USERS).min() >= 5
    assert np.bincount(items, minlength=N_ITEMS).min() >= 1
    degree = np.bincount(items, minlength=N_ITEMS)
    assert degree.max() > 5 * np.median(degree)  # skewed popularity


def test_small_scale_split(small: HeteroData) -> None:
    users, _, labels = _rows(small)
    shares = np.bincount(labels, minlength=3) / N_ROWS
    # MMRec's per-user rounding on short histories gives ~0.74/0.13/0.13 (as in baby.inter).
    assert 0.70 < shares[0] < 0.82 and 0.09 < shares[1] < 0.16 and 0.09 < shares[2] < 0.16
    assert np.bincount(users[labels == 0], minlength=N_USERS).min() >= 1
    assert torch.equal(small[RATED_BY].edge_index, small[RATES].edge_index.flip(0))


def test_small_scale_features_and_layout(small: HeteroData) -> None:
    assert small.modalities == ["image", "text"]
    x_image, x_text = small[ITEM].x_image, small[ITEM].x_text
    assert x_image.shape == (N_ITEMS, 32) and x_text.shape == (N_ITEMS, 8)
    assert x_image.dtype == x_text.dtype == torch.float32
    rng = np.random.default_rng(0)  # image first, then text, from default_rng(seed)
    np.testing.assert_array_equal(
        x_image.numpy(), rng.standard_normal((N_ITEMS, 32), dtype=np.float32)
    )
    np.testing.assert_array_equal(
        x_text.numpy(), rng.standard_normal((N_ITEMS, 8), dtype=np.float32)
    )
    # Attaching the features mirrors build_hetero_data(..., features) exactly.
    users, items, labels = _rows(small)
    feats = {"image": x_image.numpy(), "text": x_text.numpy()}
    _assert_same(
        small, build_hetero_data(users, items, labels, feats, num_users=N_USERS, num_items=N_ITEMS)
    )


def test_small_scale_deterministic(small: HeteroData) -> None:
    _assert_same(small, elec_scale(0, **asdict(SMALL_SCALE)))
    other = elec_scale(1, **asdict(SMALL_SCALE))
    assert not torch.equal(other[RATES].edge_index, small[RATES].edge_index)
    assert not torch.equal(other[ITEM].x_text, small[ITEM].x_text)


def test_uncovered_items_are_filled_exactly() -> None:
    # Steep popularity and few rows leave many items undrawn; coverage must keep the totals.
    users, items, labels = scale_interactions(
        seed=3, num_users=150, num_items=700, num_interactions=800, popularity_exponent=1.5
    )
    assert users.shape[0] == 800 and np.unique(users * 700 + items).shape[0] == 800
    assert np.bincount(users, minlength=150).min() >= 5
    assert np.bincount(items, minlength=700).min() >= 1
    assert np.all(np.diff(users * 700 + items) > 0)  # sorted by (user, item)
    assert set(np.unique(labels)) == {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_users": 100, "num_items": 50, "num_interactions": 499},  # < 5 per user
        {"num_users": 10, "num_items": 500, "num_interactions": 100},  # items left uncovered
        {"num_users": 10, "num_items": 40, "num_interactions": 200},  # > num_items // 4 per user
    ],
)
def test_infeasible_counts_raise(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        scale_interactions(**kwargs)


def _mini_folder(root: Path) -> Path:
    users, items, labels = scale_interactions(0, num_users=60, num_items=40, num_interactions=500)
    write_mmrec_folder(root / "mini", "mini", users, items, labels)
    return root / "mini"


@pytest.mark.parametrize("read_only", [False, True])
def test_amazon_loader_writes_nothing_under_root(tmp_path: Path, read_only: bool) -> None:
    folder = _mini_folder(tmp_path / "data")
    before = sorted(p.name for p in folder.iterdir())
    cache = tmp_path / "cache"
    if read_only:
        folder.chmod(0o555)
    try:
        data = amazon_with_generated_features(tmp_path / "data", "mini", cache_dir=cache, seed=4)
    finally:
        folder.chmod(0o755)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert cache.is_dir()  # the processed file always goes to cache_dir
    assert data.modalities == ["image", "text"]
    assert data[ITEM].x_image.shape == (40, 4096) and data[ITEM].x_text.shape == (40, 384)
    feats = generated_features(40, {"image": 4096, "text": 384}, seed=4)
    users, items, labels = _rows(data)
    expected = build_hetero_data(users, items, labels, feats, num_users=60, num_items=40)
    _assert_same(data, expected)


@pytest.fixture
def baby_root(data_root: Path) -> Path:
    if not (data_root / "baby" / "baby.inter").exists():
        pytest.skip(f"real baby data not found under {data_root} (set CM3_DATA_ROOT)")
    return data_root


def test_baby_with_generated_features(baby_root: Path, tmp_path: Path) -> None:
    before = os.listdir(baby_root / "baby")
    data = amazon_with_generated_features(baby_root, "baby", cache_dir=tmp_path / "cache")
    assert data[USER].num_nodes == 19_445 and data[ITEM].num_nodes == 7_050
    assert data.modalities == ["image", "text"]
    assert data[ITEM].x_image.shape == (7_050, 4096) and data[ITEM].x_text.shape == (7_050, 384)
    assert data[ITEM].x_image.dtype == data[ITEM].x_text.dtype == torch.float32
    assert data[RATES].edge_index.shape[1] > 100_000
    assert os.listdir(baby_root / "baby") == before
