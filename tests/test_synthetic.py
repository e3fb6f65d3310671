"""Tests of the synthetic multimodal generator and the MMRec folder writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cm3_pyg.data.dataset import MMRecDataset
from cm3_pyg.data.hetero import RATES, build_hetero_data
from cm3_pyg.data.mmrec import discover_modalities, load_features, read_interactions
from cm3_pyg.data.synthetic import (
    SyntheticArrays,
    make_synthetic,
    make_synthetic_arrays,
    write_mmrec_folder,
)
from cm3_pyg.errors import DataFormatError


@pytest.fixture(scope="module")
def default_arrays() -> SyntheticArrays:
    return make_synthetic_arrays()


def _assert_same(a: SyntheticArrays, b: SyntheticArrays) -> None:
    np.testing.assert_array_equal(a.users, b.users)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert list(a.features) == list(b.features)
    for m in a.features:
        np.testing.assert_array_equal(a.features[m], b.features[m])


def test_deterministic() -> None:
    kwargs = {"num_users": 200, "num_items": 150, "modality_dims": {"image": 8, "text": 5}}
    a = make_synthetic_arrays(seed=7, **kwargs)
    _assert_same(a, make_synthetic_arrays(seed=7, **kwargs))
    c = make_synthetic_arrays(seed=8, **kwargs)
    assert not np.array_equal(a.features["image"], c.features["image"])
    assert a.items.shape != c.items.shape or not np.array_equal(a.items, c.items)


def test_default_shape_and_invariants(default_arrays: SyntheticArrays) -> None:
    a = default_arrays
    assert (a.num_users, a.num_items) == (3000, 2000)
    assert 50_000 <= a.users.shape[0] <= 70_000
    assert list(a.features) == ["image", "text"]
    assert a.features["image"].shape == (2000, 64) and a.features["image"].dtype == np.float32
    assert a.features["text"].shape == (2000, 48) and a.features["text"].dtype == np.float32
    counts = np.bincount(a.users, minlength=a.num_users)
    assert counts.min() >= 5
    # Sampled without replacement: no (user, item) pair repeats.
    keys = a.users * a.num_items + a.items
    assert np.unique(keys).shape[0] == keys.shape[0]
    # Every user keeps a train row; the split is ~80/10/10.
    train_counts = np.bincount(a.users[a.labels == 0], minlength=a.num_users)
    assert train_counts.min() >= 1
    share = np.bincount(a.labels, minlength=3) / a.labels.shape[0]
    assert 0.76 <= share[0] <= 0.84 and 0.08 <= share[1] <= 0.12 and 0.08 <= share[2] <= 0.12
    # Popularity skew: the top 10% of items take a clearly outsized share of interactions.
    degree = np.sort(np.bincount(a.items, minlength=a.num_items))[::-1]
    assert degree[: a.num_items // 10].sum() / degree.sum() > 0.2


def _recall_at_20(a: SyntheticArrays, scores: np.ndarray) -> float:
    """Mean test Recall@20 with each user's train items masked."""
    train = a.labels == 0
    scores = scores.astype(np.float64, copy=True)
    scores[a.users[train], a.items[train]] = -np.inf
    top = np.argpartition(-scores, 20, axis=1)[:, :20]
    hit = np.zeros(scores.shape, dtype=bool)
    hit[np.arange(scores.shape[0])[:, None], top] = True
    test = a.labels == 2
    hits = np.bincount(
        a.users[test], weights=hit[a.users[test], a.items[test]], minlength=a.num_users
    )
    n = np.bincount(a.users[test], minlength=a.num_users)
    return float((hits[n > 0] / n[n > 0]).mean())


def test_signal_beats_popularity(default_arrays: SyntheticArrays) -> None:
    # A user profile built from train-item features alone must clearly beat popularity,
    # which shows the features carry the latent signal and affinity dominates popularity.
    a = default_arrays
    train = a.labels == 0
    popularity = np.bincount(a.items[train], minlength=a.num_items).astype(np.float64)
    pop_recall = _recall_at_20(a, np.broadcast_to(popularity, (a.num_users, a.num_items)))
    normed = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in a.features.values()]
    feats = np.concatenate(normed, axis=1)
    profile = np.zeros((a.num_users, feats.shape[1]))
    np.add.at(profile, a.users[train], feats[a.items[train]])
    feat_recall = _recall_at_20(a, profile @ feats.T)
    assert feat_recall > 2.0 * pop_recall
    # Noisier modality = weaker signal: image (noise 0.5) predicts V better than text (1.0).
    fit = {}
    for m, x in a.features.items():
        coef, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], a.item_factors, rcond=None)
        resid = a.item_factors - np.c_[x, np.ones(len(x))] @ coef
        fit[m] = 1.0 - resid.var() / a.item_factors.var()
    assert fit["image"] > fit["text"] > 0.1


def test_make_synthetic_heterodata() -> None:
    data = make_synthetic(num_users=120, num_items=90, modality_dims={"a": 3, "b": 2, "c": 4})
    arrays = make_synthetic_arrays(
        num_users=120, num_items=90, modality_dims={"a": 3, "b": 2, "c": 4}
    )
    assert data.modalities == ["a", "b", "c"]
    assert data["user"].num_nodes == 120 and data["item"].num_nodes == 90
    assert data["item"].x_c.shape == (90, 4) and data["item"].x_c.dtype == torch.float32
    assert data[RATES].edge_index.shape[1] == int((arrays.labels == 0).sum())
    assert torch.unique(data[RATES].edge_index[0]).numel() == 120
    assert data[RATES].valid_edge_index.shape[1] == int((arrays.labels == 1).sum())
    assert data[RATES].test_edge_index.shape[1] == int((arrays.labels == 2).sum())


def test_options_and_errors() -> None:
    a = make_synthetic_arrays(
        num_users=50,
        num_items=30,
        min_interactions=3,
        mean_interactions=3,
        noise_levels={"image": 0.0, "text": 0.0},
    )
    assert np.all(np.bincount(a.users) == 3)
    assert np.all(np.bincount(a.users[a.labels == 0]) >= 1)
    with pytest.raises(ValueError, match="min_interactions"):
        make_synthetic_arrays(num_users=5, num_items=4, min_interactions=5)
    with pytest.raises(ValueError, match="mean_interactions"):
        make_synthetic_arrays(mean_interactions=2.0)
    with pytest.raises(ValueError, match="num_users"):
        make_synthetic_arrays(num_users=0)


def test_write_mmrec_folder_round_trip(tmp_path: Path) -> None:
    a = make_synthetic_arrays(num_users=80, num_items=50, modality_dims={"image": 4, "text": 3})
    path = write_mmrec_folder(tmp_path / "syn", "syn", a.users, a.items, a.labels, a.features)
    assert path == tmp_path / "syn" / "syn.inter"
    assert path.read_text().splitlines()[0] == "userID\titemID\tx_label"
    inter = read_interactions(path)
    np.testing.assert_array_equal(inter.users, a.users)
    np.testing.assert_array_equal(inter.items, a.items)
    np.testing.assert_array_equal(inter.labels, a.labels)
    assert discover_modalities(path.parent) == ["image", "text"]
    feats = load_features(path.parent, ["image", "text"], num_items=50)
    np.testing.assert_array_equal(feats["text"], a.features["text"])

    data = MMRecDataset(str(path.parent))[0]
    ref = build_hetero_data(a.users, a.items, a.labels, a.features, num_users=80, num_items=50)
    for key in ("edge_index", "valid_edge_index", "test_edge_index"):
        assert torch.equal(data[RATES][key], ref[RATES][key])
    assert torch.equal(data["item"].x_image, ref["item"].x_image)

    with pytest.raises(DataFormatError, match="equal lengths"):
        write_mmrec_folder(tmp_path / "bad", "bad", [0, 1], [0], [0, 0])
    with pytest.raises(DataFormatError, match="users: expected a 1-D integer array"):
        write_mmrec_folder(tmp_path / "bad", "bad", np.array([0.5]), [0], [0])
