"""Compare registered models over small hyper-parameter grids, selecting on validation only.

For every model: grid points from the ``grid:`` of its YAML (:meth:`Recommender.default_grid`),
optionally capped by a budget; every point is trained once per seed with
:func:`~cm3_pyg.training.run_experiment`; a point's score is its mean validation Recall@20
over the seeds, the best-scoring point is selected (ties: the earlier point, the defaults
first), and its TEST metrics are reported as mean and sample standard deviation over the
seeds. Test metrics never enter the selection (MMRec selects by test Recall@20, a leak).
The selected points are then tested against each other pair by pair
(:func:`significance`, over users and over seeds).

Layout of an output folder::

    results.md, results.csv     the selected point of each model, with significance
    significance.csv            every paired test (metric, over users/seeds, pair)
    grid.csv                    every point's validation score (mean/std over seeds)
    results.png                 bar chart of the selected points (only with matplotlib)
    runs/<model>/<point>/seed<s>/metrics.json, epochs.csv, test_users.csv, artifact.pt
                                (+ checkpoint.pt if kept)
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import random
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch_geometric.data import HeteroData

from cm3_pyg.data.hetero import content_hash
from cm3_pyg.errors import ConfigError, DataFormatError, NonFiniteLossError
from cm3_pyg.experiments.significance import PairedTest, pairwise_tests
from cm3_pyg.io import atomic_write_text
from cm3_pyg.models import get_model_class
from cm3_pyg.plotting import pyplot, save_figure
from cm3_pyg.training import TEST_USERS_NAME, load_config, read_user_metrics, run_experiment
from cm3_pyg.training.artifact import ARTIFACT_NAME
from cm3_pyg.training.experiment import clear_run_folder

__all__ = [
    "GRID_MODES",
    "REPORTED_METRICS",
    "PointSummary",
    "RunRecord",
    "SignificanceReport",
    "choose_points",
    "complete_selected_runs",
    "coordinate_point",
    "grid_points",
    "model_grid",
    "model_points",
    "plot_results",
    "point_slug",
    "run_comparison",
    "select_best",
    "significance",
    "summarize",
    "write_results",
]

logger = logging.getLogger("cm3_pyg")

#: ``small``: the defaults plus every point that changes ONE key to another listed value;
#: ``full``: the Cartesian product of the listed values; ``coordinate``: the ``small`` points,
#: then the point that combines, key by key, the value whose one-key point scored best on
#: validation (:func:`coordinate_point`), trained with the same seeds.
GRID_MODES = ("small", "full", "coordinate")
#: Test metrics reported for the selected points.
REPORTED_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
SELECTION_METRIC = "recall@20"
#: a difference is "significant" below this Holm-adjusted p-value
SIGNIFICANCE_LEVEL = 0.05
#: sign vectors of the randomisation test over users
RANDOMIZATION_SAMPLES = 10_000

Params = dict[str, Any]


# --- grids ------------------------------------------------------------------------------------


def grid_points(
    defaults: Mapping[str, Any], grid: Mapping[str, Sequence[Any]], mode: str = "small"
) -> list[Params]:
    """The points of ``grid`` (values of the grid's keys only), the default point first.

    Args:
        defaults: the model's configuration defaults; ``defaults[key]`` is the default value
            of every grid key (it need not be one of the listed values).
        grid: ``{key: [values, ...]}`` in a fixed key order.
        mode: ``"small"`` (one key at a time away from the defaults: ``1 + sum(n_k - 1)``
            points when the defaults are listed), ``"coordinate"`` (the same points; the
            combined point is added after they are scored) or ``"full"`` (Cartesian product).

    Returns:
        Distinct points, each ``{key: value}`` over the grid's keys in grid order; the first
        is the default point. An empty grid gives ``[{}]``.
    """
    if mode not in GRID_MODES:
        raise ConfigError(f"grid mode must be one of {GRID_MODES}, got {mode!r}")
    keys = list(grid)
    missing = [k for k in keys if k not in defaults]
    if missing:
        raise ConfigError(f"grid keys {missing} have no default value in the model's config")
    for key in keys:
        if (
            isinstance(grid[key], (str, bytes))
            or not isinstance(grid[key], Sequence)
            or not grid[key]
        ):
            raise ConfigError(f"grid key {key!r} must list at least one value, got {grid[key]!r}")
    default = {k: defaults[k] for k in keys}
    if mode == "full":
        candidates = [
            dict(zip(keys, values, strict=True))
            for values in itertools.product(*(grid[k] for k in keys))
        ]
    else:
        candidates = [{**default, key: value} for key in keys for value in grid[key]]
    points = [default]
    for point in candidates:
        if point not in points:
            points.append(point)
    return points


def choose_points(points: Sequence[Params], budget: int | None, seed: int = 0) -> list[Params]:
    """At most ``budget`` of ``points``, always keeping ``points[0]`` (the defaults).

    The others are the first ``budget - 1`` of a shuffle seeded with ``seed`` (deterministic);
    the result keeps the order of ``points``. ``budget=None`` keeps them all.
    """
    if budget is None or budget >= len(points):
        return [dict(p) for p in points]
    if budget < 1:
        raise ConfigError(f"budget must be >= 1 grid point, got {budget}")
    rest = list(range(1, len(points)))
    random.Random(seed).shuffle(rest)
    keep = {0, *rest[: budget - 1]}
    return [dict(points[i]) for i in sorted(keep)]


def coordinate_point(default: Mapping[str, Any], scores: Sequence[tuple[Params, float]]) -> Params:
    """Per key, the value of the best-scoring point that differs from ``default`` in that key
    only (or is ``default``); keys without such a scored point keep the default value.

    Args:
        default: the default point (every grid key).
        scores: ``(point, validation score)`` pairs; NaN scores (failed points) never win,
            ties keep the earlier point (the default first when it is listed first).

    Returns:
        The combined point, over the keys of ``default`` in their order. One step of
        coordinate-wise search: it uses validation scores only, like the final selection.
    """
    combined = dict(default)
    for key in default:
        best_score = -math.inf
        for point, score in scores:
            others_default = all(point.get(k) == v for k, v in default.items() if k != key)
            if key in point and others_default and not math.isnan(score) and score > best_score:
                best_score, combined[key] = score, point[key]
    return combined


def model_grid(
    model: str, values: Mapping[str, Sequence[Any]] | None = None
) -> dict[str, list[Any]]:
    """A registered model's YAML grid with ``values`` replacing (or adding) some keys' lists.

    Replaced keys keep their place in the YAML's key order; added keys come after it.
    """
    grid = {key: list(v) for key, v in get_model_class(model).default_grid().items()}
    for key, given in (values or {}).items():
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or not given:
            raise ConfigError(
                f"grid values for {model}.{key} must list at least one value, got {given!r}"
            )
        grid[key] = list(given)
    return grid


def model_points(
    model: str,
    mode: str = "small",
    budget: int | None = None,
    seed: int = 0,
    *,
    values: Mapping[str, Sequence[Any]] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[Params]:
    """:func:`grid_points` of a registered model's grid, capped by :func:`choose_points`.

    Args:
        model: a registered model name.
        mode, budget, seed: see :func:`grid_points` and :func:`choose_points`.
        values: per-key value lists that replace or extend the YAML grid (:func:`model_grid`).
        overrides: configuration overrides applied to every run; they move the default point
            (the model's YAML defaults otherwise), so ``--set n_layers=2`` makes
            ``n_layers=2`` the point every other one is compared against.
    """
    cls = get_model_class(model)
    # the layered defaults: a grid may also search training keys such as learning_rate
    defaults = load_config(cls.default_config(), overrides=overrides)
    points = grid_points(defaults, model_grid(cls.name, values), mode)
    return choose_points(points, budget, seed)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def point_slug(point: Mapping[str, Any]) -> str:
    """A folder name for a grid point: ``key=value`` pairs joined by ``__``.

    An empty point (a model without a grid) is ``default``.
    """
    if not point:
        return "default"
    text = "__".join(f"{k}={_format_value(v)}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def describe_point(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_format_value(v)}" for k, v in point.items()) or "(defaults)"


# --- runs -------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """The outcome of one (model, grid point, seed) run."""

    model: str
    point: Params
    seed: int
    valid: dict[str, float]
    test: dict[str, float]
    epoch_seconds: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stop_reason: str = "completed"
    path: str | None = None

    @property
    def slug(self) -> str:
        return point_slug(self.point)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _same_config(
    saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any]
) -> bool:
    """``saved == current``, except that a key the saved run predates counts as equal when
    ``current`` holds that key's default (a later option whose default keeps the behaviour
    the run was trained with), so a grid kept across releases stays reusable."""
    if set(saved) - set(current):
        return False
    for key, value in current.items():
        if key in saved:
            if saved[key] != value:
                return False
        elif key not in defaults or defaults[key] != value:
            return False
    return True


def _reusable(
    path: Path,
    config: Mapping[str, Any],
    dataset: str,
    data_hash: str,
    defaults: Mapping[str, Any],
) -> dict[str, Any] | None:
    """The finished run's metrics in ``path`` if it used ``dataset`` with the same content
    (:func:`~cm3_pyg.data.hetero.content_hash`) and ``config`` (:func:`_same_config`
    against the model's full ``defaults``)."""
    file = path / "metrics.json"
    if not file.exists():
        return None
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if saved.get("stop_reason") not in ("completed", "early_stopping"):
        return None
    if saved.get("dataset") != dataset or saved.get("data_hash") != data_hash:
        return None
    saved_config = saved.get("config")
    if not isinstance(saved_config, dict):
        return None
    same = _same_config(saved_config, _jsonable(dict(config)), _jsonable(dict(defaults)))
    return saved if same else None


def _record(
    model: str, point: Params, seed: int, metrics: Mapping[str, Any], path: Path | None
) -> RunRecord:
    return RunRecord(
        model=model,
        point=dict(point),
        seed=seed,
        valid=dict(metrics.get("valid") or {}),
        test=dict(metrics.get("test") or {}),
        epoch_seconds=list(metrics.get("epoch_seconds") or []),
        best_epoch=int(metrics.get("best_epoch") or 0),
        stop_reason=str(metrics.get("stop_reason", "completed")),
        path=None if path is None else str(path),
    )


def run_comparison(
    data: HeteroData,
    models: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike[str],
    *,
    dataset_name: str = "synthetic",
    grid_mode: str = "small",
    budget: int | None = None,
    epochs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    shuffle_seed: int = 0,
    model_budgets: Mapping[str, int] | None = None,
    model_epochs: Mapping[str, int] | None = None,
    model_grid_modes: Mapping[str, str] | None = None,
    model_grid_values: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    reuse: bool = True,
    keep_checkpoints: bool = False,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    runner: Callable[..., dict[str, Any]] = run_experiment,
) -> list[RunRecord]:
    """Train every model at every chosen grid point with every seed.

    Args:
        data: the dataset.
        models: registered model names.
        seeds: one run per seed at every point.
        out_dir: each run writes ``out_dir/runs/<model>/<point>/seed<s>/``.
        dataset_name: recorded in the runs' ``metrics.json``.
        grid_mode: ``"small"``, ``"full"`` or ``"coordinate"`` (see :data:`GRID_MODES`).
        budget: at most this many points per model (the defaults always included).
        model_budgets: per-model budgets that replace ``budget`` for those models (e.g. a
            wider grid for one model whose defaults do not transfer to the data).
        epochs: overrides ``epochs`` of every run.
        model_grid_modes: per-model grid modes that replace ``grid_mode`` for those models
            (e.g. the full product for one model whose small grid is inconclusive).
        model_grid_values: per-model ``{key: [values]}`` that replace or add keys of those
            models' YAML grids (e.g. a search widened past the reference's range; the results
            must then say so). Overrides that set a grid key move the default point there.
        model_epochs: per-model epoch caps that replace ``epochs`` for those models (e.g. a
            slow model whose full early-stopped run does not fit the compute budget; the
            results must then say so).
        overrides: further config overrides for every run (grid values take precedence).
        shuffle_seed: seed of the budget's shuffle.
        reuse: keep a run folder's finished ``metrics.json`` when its dataset name, the
            data's content hash and the config are identical (resumes an interrupted
            comparison; a changed split or feature file retrains); ``False`` retrains
            everything.
        keep_checkpoints: let every run write its ``checkpoint.pt`` (per-epoch model and
            optimizer state; large for big models), off by default.
        progress: per-epoch progress bars.
        shard: ``(k, n)``, 1 <= k <= n: only the runs ``k, k + n, k + 2n, ...`` (1-based) of
            the full plan (models, then points, then seeds), so ``n`` processes or machines
            share one grid in one ``out_dir``, each writing only its own run folders; the
            coordinate step, which needs every run's score, is left to a later call without
            ``shard``, which reuses the finished runs. Only this shard's records are returned.
        runner: the function that trains one run (tests may substitute it).

    Raises:
        ConfigError: an unknown model, a bad grid, budget, shard or configuration, or a model
            needing more modalities than the data offers (all checked before anything trains).
    """
    if not models:
        raise ConfigError("no models to compare")
    compared = {m.lower() for m in models}
    budgets, epoch_caps, grid_modes, grid_values = (
        dict(given or {})
        for given in (model_budgets, model_epochs, model_grid_modes, model_grid_values)
    )
    for what, given in (
        ("budgets", budgets),
        ("epochs", epoch_caps),
        ("grid modes", grid_modes),
        ("grid values", grid_values),
    ):
        unused = sorted(set(given) - compared)
        if unused:
            raise ConfigError(f"{what} given for models that are not compared: {unused}")
    if not seeds:
        raise ConfigError("no seeds given")
    if shard is not None:
        k, n = shard
        if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
            raise ConfigError(f"shard must be (k, n) with 1 <= k <= n, got {shard!r}")
    base = dict(overrides or {})
    if epochs is not None:
        base["epochs"] = int(epochs)
    available = base.get("modalities") or list(getattr(data, "modalities", None) or [])

    # Every configuration is built (and validated) before anything trains.
    def make_config(name: str, point: Params, seed: int) -> dict[str, Any]:
        run_overrides = {**base, **point, "seed": int(seed)}
        if name in epoch_caps:
            run_overrides["epochs"] = int(epoch_caps[name])
        return load_config(get_model_class(name).default_config(), overrides=run_overrides)

    plan: list[tuple[str, Params, int, dict[str, Any]]] = []
    for name in models:
        try:
            cls = get_model_class(name)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        if len(available) < cls.min_modalities:
            raise ConfigError(
                f"model {name!r} needs at least {cls.min_modalities} item modalities, "
                f"the data has {available}"
            )
        model_budget = budgets.get(cls.name, budget)
        mode = grid_modes.get(cls.name, grid_mode)
        points = model_points(
            cls.name,
            mode,
            model_budget,
            shuffle_seed,
            values=grid_values.get(cls.name),
            overrides=base,
        )
        for point in points:
            for seed in seeds:
                plan.append((cls.name, point, int(seed), make_config(cls.name, point, seed)))
    if shard is not None:
        k, n = shard
        plan = plan[k - 1 :: n]
        logger.info("shard %d/%d: %d runs of the plan", k, n, len(plan))
    root = Path(out_dir) / "runs"
    data_hash = content_hash(data) if reuse else ""
    # every key at its default, for runs saved before a key existed (_same_config)
    defaults = {
        name: load_config(get_model_class(name).default_config())
        for name in dict.fromkeys(e[0] for e in plan)
    }

    def train(name: str, point: Params, seed: int, config: dict[str, Any]) -> RunRecord:
        path = root / name / point_slug(point) / f"seed{seed}"
        saved = _reusable(path, config, dataset_name, data_hash, defaults[name]) if reuse else None
        if saved is not None:
            logger.info("%s %s seed %d: reusing %s", name, describe_point(point), seed, path)
            return _record(name, point, seed, saved, path)
        logger.info("%s %s seed %d: training", name, describe_point(point), seed)
        clear_run_folder(path)  # an unfinished or stale run of this point: the comparison's own
        try:
            metrics = runner(
                data,
                name,
                config,
                out_dir=path,
                dataset_name=dataset_name,
                progress=progress,
                checkpoint=keep_checkpoints,
            )
        except NonFiniteLossError as exc:
            # run_experiment wrote metrics.json (best epoch before the NaN) first
            logger.error("%s %s seed %d: %s", name, describe_point(point), seed, exc)
            file = path / "metrics.json"
            metrics = json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}
            metrics["stop_reason"] = "non_finite_loss"
        return _record(name, point, seed, metrics, path)

    records = [train(*entry) for entry in plan]
    # after every small-grid run: validation scores only decide the combined point
    for name in dict.fromkeys(entry[0] for entry in plan):
        if grid_modes.get(name, grid_mode) != "coordinate":
            continue
        if shard is not None:
            logger.info("%s: the coordinate step waits for a call without a shard", name)
            continue
        own = [r for r in records if r.model == name]
        scored = [(summary.point, summary.valid_mean) for summary in summarize(own)]
        combined = coordinate_point(own[0].point, scored)  # own[0]: the default point
        if any(point == combined for point, _ in scored):
            continue
        logger.info("%s: coordinate point %s", name, describe_point(combined))
        for seed in seeds:
            records.append(train(name, combined, int(seed), make_config(name, combined, seed)))
    return records


# --- aggregation and selection ----------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN when empty."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class PointSummary:
    """One (model, grid point) over its seeds.

    ``valid_mean``/``valid_std`` are of the selection metric; ``test_mean``/``test_std`` of
    :data:`REPORTED_METRICS`; ``seconds_per_epoch`` is the median training time of all
    epochs of all seeds. A point with a failed seed (NaN loss or no validation value) has
    ``failed > 0`` and is never selected.
    """

    model: str
    point: Params
    seeds: list[int]
    valid_mean: float
    valid_std: float
    test_mean: dict[str, float]
    test_std: dict[str, float]
    seconds_per_epoch: float
    failed: int = 0

    @property
    def slug(self) -> str:
        return point_slug(self.point)

    @property
    def selectable(self) -> bool:
        return self.failed == 0 and math.isfinite(self.valid_mean)


def summarize(records: Sequence[RunRecord], metric: str = SELECTION_METRIC) -> list[PointSummary]:
    """One :class:`PointSummary` per (model, point), in the order the records first appear."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.model, record.slug), []).append(record)
    out = []
    for (model, _), group in groups.items():
        failed = sum(
            1 for r in group if r.stop_reason == "non_finite_loss" or metric not in r.valid
        )
        valid = [float(r.valid[metric]) for r in group if metric in r.valid]
        test_mean, test_std = {}, {}
        for key in REPORTED_METRICS:
            test_mean[key], test_std[key] = _mean_std(
                [float(r.test[key]) for r in group if key in r.test]
            )
        seconds = [s for r in group for s in r.epoch_seconds]
        mean, std = _mean_std(valid)
        out.append(
            PointSummary(
                model=model,
                point=dict(group[0].point),
                seeds=[r.seed for r in group],
                valid_mean=mean,
                valid_std=std,
                test_mean=test_mean,
                test_std=test_std,
                seconds_per_epoch=statistics.median(seconds) if seconds else math.nan,
                failed=failed,
            )
        )
    return out


def select_best(summaries: Sequence[PointSummary]) -> dict[str, PointSummary]:
    """Per model, the point with the highest mean VALIDATION score (ties: the earlier point).

    Only ``valid_mean`` is read: test metrics cannot influence the choice. Models none of
    whose points is selectable are left out.
    """
    best: dict[str, PointSummary] = {}
    for summary in summaries:
        if not summary.selectable:
            continue
        current = best.get(summary.model)
        if current is None or summary.valid_mean > current.valid_mean:
            best[summary.model] = summary
    return best


#: what a selected run's folder must hold for the tests over users and the geometry analysis
SELECTED_RUN_FILES = (TEST_USERS_NAME, ARTIFACT_NAME)


def complete_selected_runs(
    data: HeteroData,
    selected: Mapping[str, PointSummary],
    records: Sequence[RunRecord],
    *,
    dataset_name: str,
    progress: bool = False,
    runner: Callable[..., dict[str, Any]] = run_experiment,
) -> tuple[list[RunRecord], list[str]]:
    """Retrain the selected points' runs whose folder kept only ``metrics.json``.

    A grid too long for one machine's session keeps every run's ``metrics.json`` (small) in a
    durable place and drops the large per-run files (:data:`SELECTED_RUN_FILES`: per-user test
    metrics, a few MB each, and the artifact). Only the selected points need them, for the
    paired tests over users and the embedding analysis, so those runs are trained again from
    the configuration their ``metrics.json`` records (same seed), once the selection, which
    read validation scores only, is made. The selection is not revisited.

    Returns:
        The records with the retrained runs replaced, and one note per retrained run giving
        its selection-metric difference from the saved run (0 where training is
        deterministic on this machine).

    Raises:
        DataFormatError: a selected run's ``metrics.json`` cannot be read, or it was made on
            another dataset or other content than ``data``.
    """
    out = list(records)
    notes: list[str] = []
    data_hash = content_hash(data)
    for model, summary in selected.items():
        for index, run in enumerate(out):
            if run.model != model or run.slug != summary.slug or run.path is None:
                continue
            path = Path(run.path)
            if all((path / name).exists() for name in SELECTED_RUN_FILES):
                continue
            file = path / "metrics.json"
            try:
                saved = json.loads(file.read_text(encoding="utf-8"))
                config = dict(saved["config"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DataFormatError(f"{file}: cannot read the run's config ({exc})") from None
            if saved.get("dataset") != dataset_name or saved.get("data_hash") != data_hash:
                raise DataFormatError(
                    f"{file}: made on dataset {saved.get('dataset')!r} with content "
                    f"{saved.get('data_hash')!r}, not on {dataset_name!r} ({data_hash})"
                )
            logger.info(
                "%s %s seed %d: retraining for its per-user metrics and artifact",
                model,
                describe_point(run.point),
                run.seed,
            )
            clear_run_folder(path)
            metrics = runner(
                data,
                model,
                config,
                out_dir=path,
                dataset_name=dataset_name,
                progress=progress,
                checkpoint=False,
            )
            fresh = _record(model, run.point, run.seed, metrics, path)
            before = run.valid.get(SELECTION_METRIC, math.nan)
            after = fresh.valid.get(SELECTION_METRIC, math.nan)
            notes.append(
                f"{model} {describe_point(run.point)} seed {run.seed}: retrained for its "
                f"per-user files; validation {SELECTION_METRIC} {before:.6f} -> {after:.6f} "
                f"(difference {after - before:+.2e})"
            )
            out[index] = fresh
    return out, notes


# --- significance -----------------------------------------------------------------------------


@dataclass
class SignificanceReport:
    """Paired tests between the selected points of every pair of models.

    ``users[metric]``: over the test users (each user's metric averaged over the seeds),
    paired t-test with Holm's correction over the pairs and the sign-flip randomisation
    test; ``seeds[metric]``: over the seeds both models ran (each seed's mean test metric),
    paired t-test with Holm's correction. ``notes`` says which models or tests were left
    out, and why.
    """

    users: dict[str, list[PairedTest]] = field(default_factory=dict)
    seeds: dict[str, list[PairedTest]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    num_users: int = 0
    seed_list: list[int] = field(default_factory=list)

    def first(self, metric: str, means: Mapping[str, float]) -> tuple[str, bool, PairedTest | None]:
        """``(leader, significant, closest)``: the model with the highest mean ``metric``,
        whether it is significantly above every other model over users (Holm-adjusted
        p < :data:`SIGNIFICANCE_LEVEL`), and its test against the least-separated rival."""
        leader = max(means, key=lambda model: means[model])
        against = [t for t in self.users.get(metric, []) if leader in (t.a, t.b)]
        if not against:
            return leader, False, None

        # an untestable pair (NaN or no p-value) counts as the least separated, never significant
        def separation(test: PairedTest) -> float:
            p = test.p_adjusted
            return math.inf if p is None or math.isnan(p) else p

        closest = max(against, key=separation)
        significant = len(against) == len(means) - 1 and all(
            separation(t) < SIGNIFICANCE_LEVEL for t in against
        )
        return leader, significant, closest


def _selected_runs(summary: PointSummary, records: Sequence[RunRecord]) -> list[RunRecord]:
    return [
        r
        for r in records
        if r.model == summary.model
        and r.slug == summary.slug
        and r.stop_reason != "non_finite_loss"
    ]


def significance(
    selected: Mapping[str, PointSummary],
    records: Sequence[RunRecord],
    metrics: Sequence[str] = REPORTED_METRICS,
    randomization_samples: int = RANDOMIZATION_SAMPLES,
) -> SignificanceReport:
    """Paired tests between the selected points (:class:`SignificanceReport`), from the
    runs' ``test_users.csv`` (per-user test metrics) and ``metrics.json`` test values.

    A model whose runs lack ``test_users.csv`` (runs made before it existed) is left out of
    the tests over users and named in the notes; the tests over seeds use the seeds every
    compared model ran.
    """
    report = SignificanceReport()
    per_model: dict[str, dict[str, Any]] = {}
    users_of: dict[str, list[int]] = {}
    for model, summary in selected.items():
        runs = _selected_runs(summary, records)
        tables = []
        for run in runs:
            file = Path(run.path or "") / TEST_USERS_NAME
            if run.path is None or not file.exists():
                tables = []
                break
            tables.append(read_user_metrics(file))
        if not tables:
            report.notes.append(
                f"{model}: its runs have no {TEST_USERS_NAME}; not tested over users"
            )
            continue
        users = tables[0].users.tolist()
        if any(t.users.tolist() != users for t in tables[1:]):
            raise DataFormatError(
                f"{model}: its seeds' {TEST_USERS_NAME} hold different test users"
            )
        missing = [m for m in metrics if m not in tables[0].values]
        if missing:
            report.notes.append(
                f"{model}: {TEST_USERS_NAME} lacks {missing}; not tested over users"
            )
            continue
        users_of[model] = users
        per_model[model] = {m: sum(t.values[m] for t in tables) / len(tables) for m in metrics}
    if len(set(map(tuple, users_of.values()))) > 1:
        report.notes.append("the models' runs evaluated different test users: no test over users")
        per_model = {}
    if len(per_model) >= 2:
        report.num_users = len(next(iter(users_of.values())))
        for metric in metrics:
            samples = {model: values[metric] for model, values in per_model.items()}
            report.users[metric] = pairwise_tests(samples, randomization_samples)

    seed_sets = [{r.seed for r in _selected_runs(s, records)} for s in selected.values()]
    common = sorted(set.intersection(*seed_sets)) if seed_sets else []
    report.seed_list = common
    if len(common) < 2:
        report.notes.append("fewer than two seeds shared by every model: no test over seeds")
    elif len(selected) >= 2:
        for metric in metrics:
            samples = {}
            for model, summary in selected.items():
                by_seed = {r.seed: r.test.get(metric) for r in _selected_runs(summary, records)}
                if all(by_seed.get(seed) is not None for seed in common):
                    samples[model] = [float(by_seed[seed]) for seed in common]
            report.seeds[metric] = pairwise_tests(samples)
    return report


def _p(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if value == 0.0:  # below the smallest float
        return "<1e-300"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def _significance_lines(
    report: SignificanceReport, selected: Mapping[str, PointSummary], short: Callable[[str], str]
) -> list[str]:
    lines = [
        "",
        "## Significance of the differences (paired, two-sided)",
        "",
        f"Over users: each of the {report.num_users} test users' metric averaged over the seeds, "
        'paired t-test with Holm\'s correction over all pairs of models ("p Holm") and a '
        f"sign-flip randomisation test ({RANDOMIZATION_SAMPLES} sign vectors); effect size "
        "Cohen's d_z = mean difference / its standard deviation. Over seeds: the seeds' mean "
        f"test metrics paired by seed ({', '.join(map(str, report.seed_list)) or 'none'}), "
        f"paired t-test with Holm's correction. Significant: Holm-adjusted p < "
        f"{SIGNIFICANCE_LEVEL} over users.",
        "",
    ]
    lines += [f"- {note}" for note in report.notes]
    if report.notes:
        lines.append("")
    for metric in report.users or report.seeds:
        means = {m: s.test_mean[metric] for m, s in selected.items() if metric in s.test_mean}
        if not report.users.get(metric):
            continue
        tested = {t.a for t in report.users[metric]} | {t.b for t in report.users[metric]}
        leader, significant, closest = report.first(
            metric, {m: v for m, v in means.items() if m in tested}
        )
        p_closest = _p(closest.p_adjusted if closest else None)
        if significant:
            claim = (
                f"**{leader} is first**, significantly above every other model "
                f"(largest Holm-adjusted p {p_closest})"
            )
        else:
            rival = "" if closest is None else (closest.b if closest.a == leader else closest.a)
            claim = (
                f"{leader} has the highest mean but is **not significantly first** "
                f"(against {rival}: Holm-adjusted p {p_closest})"
            )
        lines.append(f"- test {short(metric)}: {claim}")
    lines.append("")
    seeds_of = {(t.a, t.b, metric): t for metric, tests in report.seeds.items() for t in tests}
    lines += [
        "| metric | model A | model B | A - B | d_z | p (users) | p Holm | p random "
        "| p (seeds) | p Holm (seeds) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for metric in report.users or report.seeds:
        pairs = report.users.get(metric) or report.seeds.get(metric) or []
        for test in pairs:
            over_seeds = seeds_of.get((test.a, test.b, metric))
            from_users = metric in report.users
            lines.append(
                f"| {short(metric)} | {test.a} | {test.b} | {test.mean_difference:+.4f} "
                f"| {test.effect_size:+.3f} | {_p(test.p_value if from_users else None)} "
                f"| {_p(test.p_adjusted if from_users else None)} "
                f"| {_p(test.p_randomization if from_users else None)} "
                f"| {_p(over_seeds.p_value if over_seeds else None)} "
                f"| {_p(over_seeds.p_adjusted if over_seeds else None)} |"
            )
    return lines


def _significance_rows(report: SignificanceReport) -> list[list[Any]]:
    rows = []
    for over, family in (("users", report.users), ("seeds", report.seeds)):
        for metric, tests in family.items():
            for t in tests:
                rows.append(
                    [
                        metric,
                        over,
                        t.a,
                        t.b,
                        t.n,
                        t.mean_a,
                        t.mean_b,
                        t.mean_difference,
                        t.effect_size,
                        t.t_statistic,
                        t.p_value,
                        t.p_adjusted,
                        "" if t.p_randomization is None else t.p_randomization,
                    ]
                )
    return rows


SIGNIFICANCE_HEADER = [
    "metric",
    "over",
    "model_a",
    "model_b",
    "n",
    "mean_a",
    "mean_b",
    "mean_difference",
    "effect_size_dz",
    "t",
    "p",
    "p_holm",
    "p_randomization",
]


# --- outputs ----------------------------------------------------------------------------------


def _pm(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_results(
    out_dir: str | os.PathLike[str],
    summaries: Sequence[PointSummary],
    selected: Mapping[str, PointSummary],
    meta: Mapping[str, Any] | None = None,
    significance: SignificanceReport | None = None,
) -> list[Path]:
    """Write ``results.md``, ``results.csv`` and ``grid.csv`` (and, with ``significance``,
    ``significance.csv``); returns their paths.

    Args:
        out_dir: the comparison's folder.
        summaries: every point (:func:`summarize`).
        selected: the chosen point per model (:func:`select_best`), in report order.
        meta: shown at the top of ``results.md`` (dataset, seeds, grid mode, ...).
        significance: the paired tests (:func:`significance`): a section of
            ``results.md`` (with a "first" claim only where it is significant), every test
            in ``significance.csv``, and per model in ``results.csv`` the Holm-adjusted
            p-value and effect size against the model with the highest mean.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric_names = {"recall": "R", "ndcg": "N"}

    def short(key: str) -> str:
        name, _, k = key.partition("@")
        return f"{metric_names.get(name, name)}@{k}"

    lines = ["# Model comparison", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    lines += [
        "- selection: per model, the grid point with the highest mean VALIDATION "
        f"{SELECTION_METRIC} over the seeds; test metrics are reported at that point only "
        "(mean ± sample std over seeds) and never used for selection",
        "",
        "| model | selected params | valid R@20 | "
        + " | ".join(f"test {short(k)}" for k in REPORTED_METRICS)
        + " | s/epoch (median) | points |",
        "|---|---|---|" + "---|" * len(REPORTED_METRICS) + "---|---|",
    ]
    counts: dict[str, int] = {}
    for s in summaries:
        counts[s.model] = counts.get(s.model, 0) + 1
    for model, s in selected.items():
        tests = " | ".join(_pm(s.test_mean[k], s.test_std[k]) for k in REPORTED_METRICS)
        lines.append(
            f"| {model} | {describe_point(s.point)} | {_pm(s.valid_mean, s.valid_std)} | {tests} "
            f"| {s.seconds_per_epoch:.3f} | {counts.get(model, 0)} |"
        )
    unselected = sorted({s.model for s in summaries} - set(selected))
    if unselected:
        lines += ["", f"No selectable point (every point failed): {', '.join(unselected)}."]
    lines += [
        "",
        "## Every grid point (validation only)",
        "",
        "| model | params | valid R@20 | seeds | failed |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        mark = " **selected**" if selected.get(s.model) is s else ""
        lines.append(
            f"| {s.model} | {describe_point(s.point)}{mark} | {_pm(s.valid_mean, s.valid_std)} "
            f"| {len(s.seeds)} | {s.failed} |"
        )
    if significance is not None:
        lines += _significance_lines(significance, selected, short)
    paths = [out / "results.md", out / "results.csv", out / "grid.csv"]
    atomic_write_text(paths[0], "\n".join(lines) + "\n")

    header = [
        "model",
        "params",
        "point",
        "seeds",
        f"valid_{SELECTION_METRIC}_mean",
        f"valid_{SELECTION_METRIC}_std",
    ]
    for key in REPORTED_METRICS:
        header += [f"test_{key}_mean", f"test_{key}_std"]
    header.append("seconds_per_epoch_median")
    versus: dict[str, dict[str, PairedTest]] = {}  # metric -> model -> test against the leader
    if significance is not None:
        for key in REPORTED_METRICS:
            tests = significance.users.get(key, [])
            tested = {t.a for t in tests} | {t.b for t in tests}
            means = {m: s.test_mean[key] for m, s in selected.items() if m in tested}
            if not means:
                continue
            leader = max(means, key=lambda m: means[m])
            versus[key] = {
                (t.b if t.a == leader else t.a): t for t in tests if leader in (t.a, t.b)
            }
            header += [f"test_{key}_p_holm_vs_best", f"test_{key}_effect_dz_vs_best"]
    rows = []
    for model, s in selected.items():
        row = [
            model,
            json.dumps(s.point),
            s.slug,
            " ".join(map(str, s.seeds)),
            s.valid_mean,
            s.valid_std,
        ]
        for key in REPORTED_METRICS:
            row += [s.test_mean[key], s.test_std[key]]
        row.append(s.seconds_per_epoch)
        for against in versus.values():
            test = against.get(model)
            if test is None:  # the leader itself, or a model not tested over users
                row += ["", ""]
            else:  # the effect of this model against the leader (negative: below it)
                sign = 1.0 if test.a == model else -1.0
                row += [test.p_adjusted, sign * test.effect_size]
        rows.append(row)
    atomic_write_text(paths[1], _csv_text(header, rows))

    grid_header = [
        "model",
        "params",
        "point",
        "seeds",
        "failed",
        f"valid_{SELECTION_METRIC}_mean",
        f"valid_{SELECTION_METRIC}_std",
        "selected",
    ]
    grid_rows = [
        [
            s.model,
            json.dumps(s.point),
            s.slug,
            " ".join(map(str, s.seeds)),
            s.failed,
            s.valid_mean,
            s.valid_std,
            int(selected.get(s.model) is s),
        ]
        for s in summaries
    ]
    atomic_write_text(paths[2], _csv_text(grid_header, grid_rows))
    if significance is not None:
        paths.append(out / "significance.csv")
        atomic_write_text(
            paths[3], _csv_text(SIGNIFICANCE_HEADER, _significance_rows(significance))
        )
    return paths


def plot_results(path: str | os.PathLike[str], selected: Mapping[str, PointSummary]) -> bool:
    """A bar chart of the selected points' test R@20 and N@20 (mean ± std).

    Returns ``False`` (and writes nothing) when matplotlib, an optional dependency
    (``pip install 'cm3_pyg[plot]'``), is not installed.
    """
    plt = pyplot()
    if plt is None:
        return False
    models = list(selected)
    keys = ("recall@20", "ndcg@20")
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(models) + 2.0), 3.6))
    for offset, key in enumerate(keys):
        xs = [i + (offset - 0.5) * width for i in range(len(models))]
        ax.bar(
            xs,
            [selected[m].test_mean[key] for m in models],
            width,
            yerr=[selected[m].test_std[key] for m in models],
            capsize=3,
            label=f"test {key}",
        )
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models)
    ax.set_ylabel("mean over seeds")
    ax.set_title("Selected by validation recall@20")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return True
