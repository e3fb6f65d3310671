"""The datasets the benchmark suite trains on: real Amazon graphs and an Elec-scale synthetic one.

* :func:`amazon_with_generated_features`: the real interaction graph of an MMRec Amazon
  folder (``baby``, ``sports``, ``clothing``; their folders hold no feature files) with
  generated Gaussian item features of MMRec's shapes (image 4096, text 384).
* :func:`elec_scale`: a synthetic graph with exactly Amazon-Elec's counts (192,403 users,
  63,001 items, 1,689,188 interactions), 5-core-like (>= 5 rows per user, >= 1 per item),
  Zipf-like item popularity, heavy-tailed user activity and MMRec's per-user random
  train/valid/test split, plus generated features. All counts and dimensions are
  parameters; :data:`SMALL_SCALE` is a seconds-fast configuration for tests.

Both return a HeteroData laid out as in ``docs/architecture.md`` (built by
:func:`~cm3_pyg.data.hetero.build_hetero_data`). Features only stand in for the real ones
in time and memory measurements: they are pure noise, so accuracy on them means nothing.

    python -m benchmarks.scales            # build the full Elec scale, print counts, time, RSS
    python -m benchmarks.scales --small
"""

from __future__ import annotations

import argparse
import inspect
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import HeteroData

from cm3_pyg.data import MMRecDataset, build_hetero_data
from cm3_pyg.data.hetero import ITEM, RATES, SPLIT_ATTRS, USER

__all__ = [
    "ELEC_SCALE",
    "MMREC_FEATURE_DIMS",
    "SMALL_SCALE",
    "ScaleConfig",
    "amazon_with_generated_features",
    "attach_features",
    "elec_scale",
    "generated_features",
    "scale_interactions",
]

#: Feature dimensions of MMRec's Amazon datasets (image CNN features, text sentence embeddings).
MMREC_FEATURE_DIMS: Mapping[str, int] = {"image": 4096, "text": 384}


@dataclass(frozen=True)
class ScaleConfig:
    """Size of an :func:`elec_scale` dataset; ``elec_scale(seed, **asdict(config))``."""

    num_users: int
    num_items: int
    num_interactions: int
    image_dim: int = 4096
    text_dim: int = 384


#: Amazon Electronics as prepared by MMRec (5-core).
ELEC_SCALE = ScaleConfig(num_users=192_403, num_items=63_001, num_interactions=1_689_188)
#: A test-sized configuration (well under a second).
SMALL_SCALE = ScaleConfig(
    num_users=2_000, num_items=700, num_interactions=17_000, image_dim=32, text_dim=8
)


def generated_features(
    num_items: int, dims: Mapping[str, int] = MMREC_FEATURE_DIMS, seed: int = 0
) -> dict[str, np.ndarray]:
    """Standard-normal item features, one matrix per modality.

    Drawn from a single ``numpy.random.default_rng(seed)`` in the order of ``dims``, each as
    ``rng.standard_normal((num_items, d), dtype=np.float32)``.

    Returns:
        ``{modality: float32 [num_items, d]}`` in the order of ``dims``. Memory:
        ``4 * num_items * sum(dims)`` bytes (1.13 GB for Elec's 63,001 items at 4096 + 384).
    """
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((num_items, int(d)), dtype=np.float32) for m, d in dims.items()}


def attach_features(data: HeteroData, features: Mapping[str, np.ndarray]) -> HeteroData:
    """Set ``data``'s item features and modality list exactly as ``build_hetero_data`` does.

    ``build_hetero_data(..., features)`` checks every feature for NaN/Inf with
    ``torch.isfinite``, which for a float matrix allocates about 1.7x the matrix in
    temporaries (1.7 GB more peak RSS at Elec's size). Generated features are finite by
    construction, so they are attached to the feature-less graph instead, sharing the numpy
    buffers (no copy).

    Args:
        data: a HeteroData from ``build_hetero_data`` (changed in place).
        features: ``{modality: float32 [I, d_m]}`` C-contiguous, in fusion order.

    Returns:
        ``data``, with ``data['item'].x_<m>`` and ``data.modalities == list(features)``.
    """
    num_items = int(data[ITEM].num_nodes)
    for modality, x in features.items():
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[0] != num_items:
            raise ValueError(
                f"features[{modality!r}]: expected float32 [{num_items}, d], got {x.dtype} "
                f"{tuple(x.shape)}"
            )
        data[ITEM][f"x_{modality}"] = torch.from_numpy(np.ascontiguousarray(x))
    data.modalities = list(features)
    return data


def amazon_with_generated_features(
    data_root: str | os.PathLike[str],
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> HeteroData:
    """A real MMRec interaction graph with generated features of MMRec's shapes.

    Reads ``<data_root>/<name>/<name>.inter`` (``name`` in baby, sports, clothing; feature
    files in the folder, if any, are ignored) through :class:`~cm3_pyg.data.MMRecDataset`
    with ``modalities=[]`` (the graph ``cm3_pyg.cli.load_data`` returns), then attaches
    :func:`generated_features` (``image`` ``[I, 4096]`` then ``text`` ``[I, 384]`` from
    ``default_rng(seed)``) with :func:`attach_features`. Nothing is written under
    ``data_root``: the processed cache goes to ``cache_dir`` (or ``MMRecDataset``'s default
    cache folder; ``cache_in_folder=False``).

    Args:
        data_root: folder holding the MMRec dataset folders.
        name: dataset folder name, also the ``.inter`` stem.
        cache_dir: where ``MMRecDataset`` keeps its processed file.
        seed: seed of the features.

    Returns:
        HeteroData with the real graph's users, items and splits, ``x_image`` float32
        ``[I, 4096]``, ``x_text`` float32 ``[I, 384]`` and ``modalities == ["image",
        "text"]``. Memory: the features take ``17,920 * I`` bytes (126 MB for baby's 7,050
        items, 413 MB for clothing's 23,033), the graph a few MB.
    """
    folder = Path(data_root).expanduser() / name
    options: dict[str, Any] = {"cache_dir": cache_dir}
    # `--baseline-rev` runs this module against older cm3_pyg revisions; those predate
    # cache_in_folder and cache in the folder only when it is writable (the shared data
    # is read-only, so they fall back to cache_dir as well).
    if "cache_in_folder" in inspect.signature(MMRecDataset).parameters:
        options["cache_in_folder"] = False
    graph = MMRecDataset(folder, name=name, modalities=[], **options)[0]
    features = generated_features(int(graph[ITEM].num_nodes), MMREC_FEATURE_DIMS, seed)
    return attach_features(graph, features)


# --------------------------------------------------------------------------- Elec scale


def _user_counts(
    rng: np.random.Generator,
    num_users: int,
    num_interactions: int,
    min_count: int,
    max_count: int,
    activity_tail: float,
) -> np.ndarray:
    """Heavy-tailed rows per user in ``[min_count, max_count]`` summing to ``num_interactions``.

    ``min_count`` plus a Lomax (Pareto II, shape ``activity_tail``) share of the remaining
    rows, floored and capped; the rows lost to rounding and capping go one by one to random
    users with room left.

    Returns:
        int64 ``[num_users]``.
    """
    spare = num_interactions - num_users * min_count
    weights = rng.pareto(activity_tail, num_users)
    if weights.sum() <= 0:
        weights = np.ones(num_users)
    extra = np.floor(weights * (spare / weights.sum())).astype(np.int64)
    np.minimum(extra, max_count - min_count, out=extra)
    deficit = spare - int(extra.sum())
    while deficit > 0:  # at most a few rounds: each fills all room or the whole deficit
        room = np.flatnonzero(extra < max_count - min_count)
        take = room if room.size <= deficit else rng.choice(room, deficit, replace=False)
        extra[take] += 1
        deficit -= int(take.size)
    return min_count + extra


def _distinct_items(
    rng: np.random.Generator, counts: np.ndarray, num_items: int, popularity: np.ndarray
) -> np.ndarray:
    """``counts[u]`` distinct items for every user ``u``, drawn by ``popularity``.

    Rejection sampling on the shortfall: every round draws each user's missing rows (with
    replacement, by popularity) and keeps the (user, item) keys not seen yet, so a round
    costs O(rows still missing + E). After 32 rounds the draws become uniform, which
    converges quickly because no user holds more than half of the items.

    Returns:
        int64 ``[E]`` sorted unique keys ``user * num_items + item``.
    """
    num_users = counts.shape[0]
    cdf = np.cumsum(popularity)
    cdf /= cdf[-1]
    keys = np.empty(0, dtype=np.int64)
    need = counts
    rounds = 0
    while True:
        total = int(need.sum())
        if total == 0:
            return keys
        users = np.repeat(np.arange(num_users, dtype=np.int64), need)
        if rounds < 32:
            items = np.searchsorted(cdf, rng.random(total), side="right")
            np.minimum(items, num_items - 1, out=items)  # guards cdf[-1] rounding
        else:
            items = rng.integers(0, num_items, total)
        drawn = np.unique(users * num_items + items)
        if keys.size:
            pos = np.minimum(np.searchsorted(keys, drawn), keys.size - 1)
            drawn = drawn[keys[pos] != drawn]
        # Two sorted runs: the stable (tim)sort merges them in linear time.
        keys = np.sort(np.concatenate([keys, drawn]), kind="stable")
        need = counts - np.bincount(keys // num_items, minlength=num_users)
        rounds += 1


def _cover_items(
    rng: np.random.Generator, users: np.ndarray, items: np.ndarray, num_items: int
) -> None:
    """Give every item at least one row, in place, keeping every user's row count.

    Each item without rows replaces the item of one random row whose item keeps another
    row (one random row of every item is never replaced). An item without rows is new to
    every user, so no (user, item) pair repeats. Needs ``E >= num_items``.
    """
    degree = np.bincount(items, minlength=num_items)
    missing = np.flatnonzero(degree == 0)
    if missing.size == 0:
        return
    perm = rng.permutation(items.shape[0])
    by_item = perm[np.argsort(items[perm], kind="stable")]  # grouped by item, random within
    first = (np.cumsum(degree) - degree)[degree > 0]
    donors = np.delete(by_item, first)
    items[rng.choice(donors, missing.size, replace=False)] = rng.permutation(missing)


def scale_interactions(
    seed: int = 0,
    num_users: int = ELEC_SCALE.num_users,
    num_items: int = ELEC_SCALE.num_items,
    num_interactions: int = ELEC_SCALE.num_interactions,
    min_interactions: int = 5,
    max_interactions: int | None = None,
    popularity_exponent: float = 0.6,
    activity_tail: float = 2.5,
    split_ratios: tuple[float, float] = (0.1, 0.1),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The interaction rows of an :func:`elec_scale` graph (no features).

    1. Rows per user: ``min_interactions`` plus a heavy-tailed (Lomax, shape
       ``activity_tail``) share, capped at ``max_interactions`` and adjusted to sum to
       exactly ``num_interactions``.
    2. Item popularity ``rank ** -popularity_exponent`` over a random ranking of the items
       (0.6 puts ~0.5% of the rows on the top item at Elec's size, like MMRec's Amazon sets).
    3. Each user's items are drawn by popularity without repeats (rejection on the
       shortfall), then items left without rows take over rows of items that have several.
    4. MMRec-style split per user: ``round(ratio * n_u)`` valid and test rows at random,
       the rest train, always >= 1 train row (the rule of the embedded synthetic data).

    All draws come from ``numpy.random.default_rng([seed, 1])``; no loop runs over users or
    rows and no users x items matrix is formed.

    Args:
        seed: seed of the graph.
        num_users, num_items, num_interactions: exact ``U``, ``I`` and ``E``.
        min_interactions: fewest rows per user (5 for a 5-core).
        max_interactions: most rows per user; default ``max(min_interactions, I // 4)``,
            at most ``I // 2`` (more would make popularity sampling without repeats slow).
        popularity_exponent: Zipf exponent of item popularity (0 = uniform).
        activity_tail: Lomax shape of user activity (smaller = heavier tail; > 1).
        split_ratios: (valid, test) fraction of each user's rows.

    Returns:
        ``(users, items, labels)``, int64 ``[E]`` each, sorted by (user, item); labels
        0/1/2 = train/valid/test. Memory: about ``100 * E`` bytes at peak (~170 MB at
        Elec's size), 24 bytes per row returned.

    Raises:
        ValueError: counts that cannot satisfy the constraints.
    """
    if num_users < 1 or num_items < 1 or min_interactions < 1:
        raise ValueError(
            f"num_users/num_items/min_interactions: expected >= 1, got "
            f"{num_users}/{num_items}/{min_interactions}"
        )
    if max_interactions is None:
        max_interactions = max(min_interactions, num_items // 4)
    if not min_interactions <= max_interactions <= num_items // 2:
        raise ValueError(
            f"max_interactions: expected min_interactions ({min_interactions}) .. "
            f"num_items // 2 ({num_items // 2}), got {max_interactions}"
        )
    low, high = num_users * min_interactions, num_users * max_interactions
    if not max(low, num_items) <= num_interactions <= high:
        raise ValueError(
            f"num_interactions: expected {max(low, num_items)}..{high} (every user "
            f"{min_interactions}..{max_interactions} rows, every item >= 1), "
            f"got {num_interactions}"
        )
    if activity_tail <= 1:
        raise ValueError(f"activity_tail: expected > 1 (finite mean), got {activity_tail}")
    rng = np.random.default_rng([seed, 1])
    counts = _user_counts(
        rng, num_users, num_interactions, min_interactions, max_interactions, activity_tail
    )
    popularity = (rng.permutation(num_items) + 1.0) ** -popularity_exponent
    keys = _distinct_items(rng, counts, num_items, popularity)
    users, items = keys // num_items, keys % num_items
    del keys
    _cover_items(rng, users, items, num_items)
    # Re-sort by (user, item); users are already grouped, so sort items within users.
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    # imported here: older cm3_pyg revisions (benchmark baselines) lack it, and they only
    # load the real graphs
    from cm3_pyg.data import per_user_split_labels

    labels = per_user_split_labels(rng, users, counts, split_ratios)
    return users, items, labels


def elec_scale(
    seed: int = 0,
    num_users: int = 192_403,
    num_items: int = 63_001,
    num_interactions: int = 1_689_188,
    image_dim: int = 4096,
    text_dim: int = 384,
) -> HeteroData:
    """An Amazon-Elec-scale synthetic dataset (rows of :func:`scale_interactions`).

    Args:
        seed: seed of the graph (``default_rng([seed, 1])``) and of the features
            (:func:`generated_features`, ``default_rng(seed)``).
        num_users, num_items, num_interactions: exact ``U``, ``I`` and ``E``.
        image_dim, text_dim: feature dimensions.

    Returns:
        HeteroData (``docs/architecture.md`` layout) with exactly ``U`` users, ``I`` items
        and ``E`` unique (user, item) rows over the train/valid/test splits, ``x_image``
        float32 ``[I, image_dim]``, ``x_text`` float32 ``[I, text_dim]`` and
        ``modalities == ["image", "text"]``. Memory: the features take
        ``4 * I * (image_dim + text_dim)`` bytes (1.13 GB at full size), the graph 24 bytes
        per row (40 MB) after a transient of about 100 bytes per row (170 MB) while it is
        sampled. At full size: about 1.5 GB peak RSS including torch (~0.33 GB), and
        about 10 s on one core (half of it drawing the features).
    """
    users, items, labels = scale_interactions(seed, num_users, num_items, num_interactions)
    data = build_hetero_data(users, items, labels, num_users=num_users, num_items=num_items)
    del users, items, labels
    features = generated_features(num_items, {"image": image_dim, "text": text_dim}, seed)
    return attach_features(data, features)


def _split_counts(data: HeteroData) -> dict[str, int]:
    return {split: int(data[RATES][attr].shape[1]) for split, attr in SPLIT_ATTRS.items()}


def main(argv: list[str] | None = None) -> None:
    """Build one Elec-scale dataset and print its counts, build time and peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="use SMALL_SCALE")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = SMALL_SCALE if args.small else ELEC_SCALE
    start = time.perf_counter()
    data = elec_scale(args.seed, **asdict(config))
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    splits = _split_counts(data)
    total = sum(splits.values())
    shares = ", ".join(f"{s} {n} ({n / total:.3f})" for s, n in splits.items())
    print(f"{config}")
    print(f"users {data[USER].num_nodes}, items {data[ITEM].num_nodes}, rows {total}: {shares}")
    for m in data.modalities:
        x = data[ITEM][f"x_{m}"]
        print(f"x_{m}: {tuple(x.shape)} {x.dtype}")
    print(f"built in {seconds:.1f} s, peak RSS {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
