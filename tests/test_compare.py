"""Model comparison (cm3_pyg.experiments.compare, cm3-pyg compare): grids, budget,
selection on validation only, aggregation over seeds, output files, end-to-end runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from cm3_pyg.data import make_synthetic
from cm3_pyg.errors import ConfigError, DataFormatError, NonFiniteLossError
from cm3_pyg.experiments import (
    RunRecord,
    choose_points,
    coordinate_point,
    grid_points,
    model_grid,
    model_points,
    point_slug,
    run_comparison,
    select_best,
    significance,
    summarize,
    write_results,
)
from cm3_pyg.experiments.significance import t_two_sided_p
from cm3_pyg.metrics import PerUserMetrics
from cm3_pyg.models import get_model_class
from cm3_pyg.training import (
    TEST_USERS_NAME,
    load_config,
    read_user_metrics,
    run_experiment,
    write_user_metrics,
)
from tests.conftest import REPO

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(num_users=100, num_items=70, modality_dims={"image": 6}, seed=1)


def recording_runner(
    calls,
    valid=lambda config: 0.1,
    test=lambda config, valid: valid,
    diverges=lambda config: False,
):
    """A stand-in for run_experiment that appends ``(model, config, out_dir)`` to ``calls``
    and returns metrics whose validation and test Recall/NDCG come from ``valid``/``test``;
    a run for which ``diverges(config)`` holds raises NonFiniteLossError instead."""

    def runner(data, name, config, out_dir, dataset_name, progress, checkpoint):
        calls.append((name, config, str(out_dir)))
        if diverges(config):
            raise NonFiniteLossError(1, 1, 1, float("nan"))
        score = valid(config)
        value = test(config, score)
        return {
            "valid": {"recall@20": score},
            "test": {f"{m}@{k}": value for m in ("recall", "ndcg") for k in (10, 20)},
            "epoch_seconds": [0.1],
            "best_epoch": 1,
            "stop_reason": "completed",
            "config": config,
        }

    return runner


# --- grids and budget ---------------------------------------------------------------------------


def test_grid_points_small_and_full():
    defaults = {"a": 1, "b": "x", "c": 0.5, "other": 7}
    grid = {"a": [1, 2, 3], "b": ["x", "y"], "c": [0.1]}
    small = grid_points(defaults, grid, "small")
    assert small == [
        {"a": 1, "b": "x", "c": 0.5},  # the defaults first (c's default is not listed)
        {"a": 2, "b": "x", "c": 0.5},
        {"a": 3, "b": "x", "c": 0.5},
        {"a": 1, "b": "y", "c": 0.5},
        {"a": 1, "b": "x", "c": 0.1},
    ]
    full = grid_points(defaults, grid, "full")
    assert full[0] == small[0] and len(full) == 1 + 3 * 2
    assert {tuple(p.values()) for p in full[1:]} == {
        (a, b, 0.1) for a in (1, 2, 3) for b in ("x", "y")
    }
    # listed defaults are not repeated
    assert len(grid_points({"a": 2}, {"a": [1, 2, 3]}, "full")) == 3
    assert grid_points({"a": 1}, {}, "small") == [{}]
    with pytest.raises(ConfigError, match="grid mode"):
        grid_points(defaults, grid, "huge")
    with pytest.raises(ConfigError, match="no default"):
        grid_points({}, {"a": [1]})
    with pytest.raises(ConfigError, match="at least one value"):
        grid_points({"a": 1}, {"a": []})


def test_budget_keeps_the_defaults_and_is_deterministic():
    points = [{"k": i} for i in range(10)]
    assert choose_points(points, None) == points
    assert choose_points(points, 50) == points
    assert choose_points(points, 1) == [{"k": 0}]
    three = choose_points(points, 3, seed=0)
    assert len(three) == 3 and three[0] == {"k": 0}
    assert three == choose_points(points, 3, seed=0)  # deterministic
    assert [p["k"] for p in three] == sorted(p["k"] for p in three)  # grid order kept
    # nested budgets: a larger budget extends a smaller one (the first N of one shuffle)
    five = choose_points(points, 5, seed=0)
    assert all(p in five for p in three)
    assert any(choose_points(points, 3, seed=s) != three for s in range(1, 6))
    with pytest.raises(ConfigError, match="budget"):
        choose_points(points, 0)


def test_model_points_from_the_yaml_grids():
    cm3_small = model_points("cm3", "small")
    assert len(cm3_small) == 1 + 1 + 1 + 1 + 2  # n_ui_layers, gamma, max_sim, alpha
    assert cm3_small[0] == {"n_ui_layers": 3, "gamma": 0.9, "max_sim": 1.0, "alpha": 0.5}
    assert len(model_points("cm3", "full")) == 2 * 2 * 2 * 3
    assert len(model_points("lirdrec", "full")) == 3 * 2 * 3 * 3 * 3
    capped = model_points("lirdrec", "full", budget=4)
    assert len(capped) == 4 and capped[0] == model_points("lirdrec", "small")[0]
    slugs = {point_slug(p) for p in model_points("lirdrec", "full")}
    assert len(slugs) == 162 and all("/" not in s and " " not in s for s in slugs)
    assert point_slug({}) == "default"
    assert point_slug({"n_layers": 2, "reg_weight": 1e-05}) == "n_layers=2__reg_weight=1e-05"


# --- aggregation and selection ------------------------------------------------------------------


def record(model, point, seed, valid, test, seconds=(1.0, 2.0), stop="completed"):
    metrics = {f"{m}@{k}": test for m in ("recall", "ndcg") for k in (10, 20)}
    return RunRecord(
        model=model,
        point=dict(point),
        seed=seed,
        valid={"recall@20": valid},
        test=metrics,
        epoch_seconds=list(seconds),
        stop_reason=stop,
    )


def fake_records():
    """Validation and test disagree: the best-valid point has the worse test score."""
    return [
        record("m", {"x": 1}, 1, valid=0.30, test=0.10),
        record("m", {"x": 1}, 2, valid=0.32, test=0.12),
        record("m", {"x": 2}, 1, valid=0.20, test=0.50),  # test-best, valid-worse
        record("m", {"x": 2}, 2, valid=0.22, test=0.52),
        record("m", {"x": 3}, 1, valid=0.90, test=0.90, stop="non_finite_loss"),  # failed
        record("m", {"x": 3}, 2, valid=0.90, test=0.90),
        record("n", {"y": 1}, 1, valid=0.25, test=0.3),
        record("n", {"y": 2}, 1, valid=0.25, test=0.4),  # a tie: the earlier point wins
    ]


def test_selection_uses_validation_only():
    summaries = summarize(fake_records())
    assert [(s.model, s.point) for s in summaries] == [
        ("m", {"x": 1}),
        ("m", {"x": 2}),
        ("m", {"x": 3}),
        ("n", {"y": 1}),
        ("n", {"y": 2}),
    ]
    best = select_best(summaries)
    assert best["m"].point == {"x": 1}  # valid 0.31 > 0.21 although its test is lower
    assert best["n"].point == {"y": 1}
    assert summaries[2].failed == 1 and not summaries[2].selectable
    first = summaries[0]
    assert first.valid_mean == pytest.approx(0.31)
    assert first.valid_std == pytest.approx(statistics.stdev([0.30, 0.32]))
    assert first.test_mean["recall@20"] == pytest.approx(0.11)
    assert first.test_std["ndcg@10"] == pytest.approx(statistics.stdev([0.10, 0.12]))
    assert first.seconds_per_epoch == 1.5 and first.seeds == [1, 2]
    assert summaries[3].valid_std == 0.0  # one seed
    # changing test metrics never changes the choice; changing validation does
    flipped = fake_records()
    for r in flipped:
        r.test = {k: 1.0 - v for k, v in r.test.items()}
    assert select_best(summarize(flipped))["m"].point == {"x": 1}
    flipped[2].valid["recall@20"] = flipped[3].valid["recall@20"] = 0.5
    assert select_best(summarize(flipped))["m"].point == {"x": 2}


def test_write_results_files(tmp_path):
    summaries = summarize(fake_records())
    selected = select_best(summaries)
    paths = write_results(tmp_path, summaries, selected, {"dataset": "fake"})
    assert [p.name for p in paths] == ["results.md", "results.csv", "grid.csv"]
    md = (tmp_path / "results.md").read_text()
    assert "VALIDATION recall@20" in md and "- dataset: fake" in md
    assert "| m | x=1 | 0.3100 ± 0.0141 | 0.1100 ± 0.0141 |" in md
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["model"] for r in rows] == ["m", "n"]
    assert json.loads(rows[0]["params"]) == {"x": 1}
    assert float(rows[0]["test_recall@20_mean"]) == pytest.approx(0.11)
    assert float(rows[0]["seconds_per_epoch_median"]) == 1.5
    grid = list(csv.DictReader((tmp_path / "grid.csv").open()))
    assert len(grid) == 5 and [r["selected"] for r in grid] == ["1", "0", "0", "1", "0"]


# --- running -----------------------------------------------------------------------------------


def test_run_comparison_configs_and_validation_selection_with_a_fake_runner(tiny, tmp_path):
    seen = []
    # validation prefers reg_weight=2.0, test prefers the default 0.001
    scores = {2.0: (0.4, 0.1), 0.001: (0.2, 0.9)}
    runner = recording_runner(
        seen,
        valid=lambda c: scores.get(c["reg_weight"], (0.0, 0.0))[0],
        test=lambda c, valid: scores.get(c["reg_weight"], (0.0, 0.0))[1],
        diverges=lambda c: c["reg_weight"] == 1.0,  # a diverging point: never selected
    )

    records = run_comparison(
        tiny, ["bprmf"], [5, 6], tmp_path, budget=None, epochs=3, runner=runner
    )
    points = model_points("bprmf", "small")
    assert len(records) == 2 * len(points) == len(seen)
    assert {(config["seed"], config["epochs"]) for _, config, _ in seen} == {(5, 3), (6, 3)}
    assert seen[0][2] == str(tmp_path / "runs" / "bprmf" / "reg_weight=0.001" / "seed5")
    summaries = summarize(records)
    assert [s.failed for s in summaries if s.point == {"reg_weight": 1.0}] == [2]
    best = select_best(summaries)["bprmf"]
    assert best.point == {"reg_weight": 2.0} and best.test_mean["recall@20"] == 0.1
    with pytest.raises(ConfigError, match="needs at least 2 item modalities"):
        run_comparison(tiny, ["sea"], [1], tmp_path, runner=runner)
    with pytest.raises(ConfigError, match="unknown model"):
        run_comparison(tiny, ["nope"], [1], tmp_path, runner=runner)


def test_per_model_budgets_replace_the_default_budget(tiny, tmp_path):
    seen = []
    runner = recording_runner(seen)

    run_comparison(
        tiny,
        ["bprmf", "lightgcn"],
        [1],
        tmp_path,
        budget=1,
        model_budgets={"lightgcn": 3},
        runner=runner,
    )
    counts = {m: sum(1 for name, _, _ in seen if name == m) for m in ("bprmf", "lightgcn")}
    assert counts == {"bprmf": 1, "lightgcn": 3}
    with pytest.raises(ConfigError, match="not compared"):
        run_comparison(tiny, ["bprmf"], [1], tmp_path, model_budgets={"bm3": 2}, runner=runner)


def test_per_model_epochs_replace_the_default_epochs(tiny, tmp_path):
    calls = []
    runner = recording_runner(calls)

    run_comparison(
        tiny,
        ["bprmf", "lightgcn"],
        [1],
        tmp_path,
        budget=1,
        epochs=7,
        model_epochs={"lightgcn": 3},
        runner=runner,
    )
    assert {name: config["epochs"] for name, config, _ in calls} == {"bprmf": 7, "lightgcn": 3}
    # without a global cap the other models keep their configs' epochs
    run_comparison(
        tiny,
        ["bprmf", "lightgcn"],
        [1],
        tmp_path / "b",
        budget=1,
        model_epochs={"bprmf": 2},
        runner=runner,
    )
    assert {name: config["epochs"] for name, config, _ in calls[2:]} == {
        "bprmf": 2,
        "lightgcn": load_config(get_model_class("lightgcn").default_config())["epochs"],
    }
    with pytest.raises(ConfigError, match="epochs given for models that are not compared"):
        run_comparison(tiny, ["bprmf"], [1], tmp_path, model_epochs={"sea": 2}, runner=runner)


def test_budget_argument_parsing():
    import argparse

    from cm3_pyg.cli.compare import _budget, _describe_budget, _describe_per_model, _epochs, _grid

    assert _budget("2") == (2, {})
    assert _budget("1,bm3=4, CM3=2") == (1, {"bm3": 4, "cm3": 2})
    assert _budget("bm3=4") == (None, {"bm3": 4})
    assert _describe_budget(1, {"bm3": 4}) == "1 (bm3: 4)"
    for bad in ("x", "bm3=0", "bm3=two"):
        with pytest.raises(argparse.ArgumentTypeError, match="budget"):
            _budget(bad)
        with pytest.raises(argparse.ArgumentTypeError, match="epochs"):
            _epochs(bad)
    assert _epochs("300,sea=120") == (300, {"sea": 120})
    assert _grid("coordinate, BM3=full") == ("coordinate", {"bm3": "full"})
    assert _grid("bm3=small") == (None, {"bm3": "small"})
    for bad in ("nope", "bm3=wide"):
        with pytest.raises(argparse.ArgumentTypeError, match="grid"):
            _grid(bad)
    assert _describe_per_model(None, {"sea": 120}, "config default") == "config default (sea: 120)"


def test_end_to_end_two_cheap_models_reuses_finished_runs(tiny, tmp_path):
    kwargs = {"budget": 2, "epochs": 1, "overrides": {"train_batch_size": 1024}}
    records = run_comparison(tiny, ["bprmf", "lightgcn"], [999, 1000], tmp_path, **kwargs)
    assert len(records) == 2 * 2 * 2
    for r in records:
        folder = tmp_path / "runs" / r.model / r.slug / f"seed{r.seed}"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["config"]["seed"] == r.seed and metrics["epochs_run"] == 1
        assert not (folder / "checkpoint.pt").exists()
        assert 0.0 <= r.test["recall@20"] <= 1.0 and r.valid == metrics["valid"]

    # every run kept its test users' metrics; their means are its metrics.json test values
    for r in records:
        table = read_user_metrics(
            tmp_path / "runs" / r.model / r.slug / f"seed{r.seed}" / TEST_USERS_NAME
        )
        for key, value in r.test.items():
            assert math.isclose(float(table.values[key].mean()), value, rel_tol=1e-9, abs_tol=1e-12)
    # the paired test over users, recomputed by hand from the files in float64
    selected = select_best(summarize(records))
    report = significance(selected, records)
    (test,) = [t for t in report.users["recall@20"]]
    per_model = {}
    for model, summary in selected.items():
        runs = [r for r in records if r.model == model and r.slug == summary.slug]
        tables = [read_user_metrics(r.path + "/" + TEST_USERS_NAME) for r in runs]
        per_model[model] = sum(t.values["recall@20"] for t in tables) / len(tables)
    diff = (per_model[test.a] - per_model[test.b]).tolist()
    mean = statistics.fmean(diff)
    t_stat = mean / (statistics.stdev(diff) / math.sqrt(len(diff)))
    assert test.n == len(diff) == report.num_users
    assert math.isclose(test.t_statistic, t_stat, rel_tol=1e-9)
    assert math.isclose(test.p_value, t_two_sided_p(t_stat, len(diff) - 1), rel_tol=1e-12)
    assert report.seed_list == [999, 1000] and len(report.seeds["recall@20"]) == 1

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was retrained")

    again = run_comparison(
        tiny, ["bprmf", "lightgcn"], [999, 1000], tmp_path, runner=fail, **kwargs
    )
    assert [(r.model, r.point, r.seed, r.test) for r in again] == [
        (r.model, r.point, r.seed, r.test) for r in records
    ]
    # the same name and config on other content (one test edge fewer): every run retrains
    changed = tiny.clone()
    store = changed["user", "rates", "item"]
    store.test_edge_index = store.test_edge_index[:, 1:]
    retrained = []

    def count(data, name, config, out_dir, **kwargs):
        retrained.append(name)
        return run_experiment(data, name, config, out_dir=out_dir, **kwargs)

    run_comparison(changed, ["bprmf", "lightgcn"], [999, 1000], tmp_path, runner=count, **kwargs)
    assert len(retrained) == len(records)


def test_compare_script_on_synthetic_data(tmp_path):
    out = tmp_path / "cmp"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "compare_models.py"),
            "--models",
            "bprmf,lightgcn",
            "--seeds",
            "999,1000",
            "--budget",
            "2",
            "--epochs",
            "1",
            "--synthetic-size",
            "150,100",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    md = (out / "results.md").read_text()
    assert "| bprmf |" in md and "| lightgcn |" in md and "- dataset: synthetic" in md
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["model"] for r in rows] == ["bprmf", "lightgcn"]
    for row in rows:
        assert row["seeds"] == "999 1000"
        for seed in (999, 1000):
            metrics = out / "runs" / row["model"] / row["point"] / f"seed{seed}" / "metrics.json"
            assert json.loads(metrics.read_text())["dataset"] == "synthetic"
    assert len(list((out / "runs" / "lightgcn").iterdir())) == 2  # the budget
    assert "## Significance of the differences" in md and "p Holm" in md
    tests = list(csv.DictReader((out / "significance.csv").open()))
    # one pair, four metrics, over users and over seeds
    assert sorted({(t["model_a"], t["model_b"]) for t in tests}) == [("bprmf", "lightgcn")]
    assert sorted((t["metric"], t["over"]) for t in tests) == sorted(
        (m, over)
        for m in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
        for over in ("users", "seeds")
    )
    assert "test_recall@20_p_holm_vs_best" in rows[0]
    assert (out / "results.png").exists() == HAS_MATPLOTLIB
    bad = subprocess.run(
        [sys.executable, str(REPO / "examples" / "compare_models.py"), "--models", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert bad.returncode == 2 and "unknown model" in bad.stderr


def test_coordinate_point_combines_the_best_value_of_each_key():
    default = {"a": 1, "b": 0.5, "c": "x"}
    scores = [
        ({"a": 1, "b": 0.5, "c": "x"}, 0.10),
        ({"a": 2, "b": 0.5, "c": "x"}, 0.12),  # a=2 beats the default
        ({"a": 3, "b": 0.5, "c": "x"}, 0.11),
        ({"a": 1, "b": 0.3, "c": "x"}, 0.09),  # b keeps its default
        ({"a": 1, "b": 0.5, "c": "y"}, float("nan")),  # failed: never chosen
        ({"a": 2, "b": 0.3, "c": "y"}, 0.99),  # two keys changed: not a one-key point
    ]
    assert coordinate_point(default, scores) == {"a": 2, "b": 0.5, "c": "x"}
    # a tie keeps the earlier point; a key without any scored one-key point keeps its default
    tied = [({"a": 1, "b": 0.5, "c": "x"}, 0.1), ({"a": 2, "b": 0.5, "c": "x"}, 0.1)]
    assert coordinate_point(default, tied) == default
    assert coordinate_point(default, [({"a": 3, "b": 0.5, "c": "x"}, 0.2)])["a"] == 3


def test_coordinate_mode_trains_the_combined_point_with_every_seed(tiny, tmp_path, monkeypatch):
    calls = []
    # validation rewards 2 layers and reg 0.01 separately; test is made to disagree
    runner = recording_runner(
        calls,
        valid=lambda c: 0.1 + 0.01 * (c["n_layers"] == 2) + 0.02 * (c["reg_weight"] == 0.01),
        test=lambda c, valid: 0.5 - valid,
    )

    grid = {"n_layers": [1, 2], "reg_weight": [0.1, 0.01]}
    cls = get_model_class("bm3")
    monkeypatch.setattr(cls, "default_grid", classmethod(lambda c: grid))
    records = run_comparison(tiny, ["bm3"], [1, 2], tmp_path, grid_mode="coordinate", runner=runner)
    points = [(r.point["n_layers"], r.point["reg_weight"]) for r in records]
    default = (cls.default_config()["n_layers"], cls.default_config()["reg_weight"])
    assert points[:2] == [default, default]  # the small grid first, the defaults first
    assert points[-2:] == [(2, 0.01), (2, 0.01)]  # then the combination, once per seed
    combined = [c["seed"] for _, c, _ in calls if (c["n_layers"], c["reg_weight"]) == (2, 0.01)]
    assert sorted(combined) == [1, 2]
    assert len(set(points)) == 4 and len(records) == 8
    best = select_best(summarize(records))["bm3"]
    assert best.point == {**best.point, "n_layers": 2, "reg_weight": 0.01}


def test_per_model_grid_modes_replace_the_default_mode(tiny, tmp_path):
    seen = []
    runner = recording_runner(seen)
    run_comparison(
        tiny,
        ["bprmf", "lightgcn"],
        [1],
        tmp_path,
        grid_mode="small",
        model_grid_modes={"lightgcn": "full"},
        runner=runner,
    )
    counts = {m: sum(1 for name, _, _ in seen if name == m) for m in ("bprmf", "lightgcn")}
    assert counts == {
        "bprmf": len(model_points("bprmf", "small")),
        "lightgcn": len(model_points("lightgcn", "full")),
    }
    assert len(model_points("lightgcn", "full")) > len(model_points("lightgcn", "small"))
    with pytest.raises(ConfigError, match="grid modes given for models that are not compared"):
        run_comparison(tiny, ["bprmf"], [1], tmp_path, model_grid_modes={"sea": "full"})
    with pytest.raises(ConfigError, match="grid mode must be one of"):
        run_comparison(tiny, ["bprmf"], [1], tmp_path, model_grid_modes={"bprmf": "wide"})


def test_grid_values_replace_yaml_keys_and_overrides_move_the_default_point():
    yaml_grid = get_model_class("bm3").default_grid()
    widened = model_grid("bm3", {"n_layers": [2, 3, 4], "cl_weight": [1.0]})
    assert list(widened) == [*yaml_grid, "cl_weight"]  # replaced keys keep their place
    assert widened["n_layers"] == [2, 3, 4] and widened["dropout"] == yaml_grid["dropout"]
    # a --set of a grid key makes that value the default point; the others follow the grid
    points = model_points(
        "bm3",
        "full",
        values={"n_layers": [2, 3, 4], "dropout": [0.3], "reg_weight": [0.1]},
        overrides={"n_layers": 2, "dropout": 0.3},
    )
    assert points == [{"n_layers": n, "dropout": 0.3, "reg_weight": 0.1} for n in (2, 3, 4)]
    # without the overrides the YAML default (n_layers=1, dropout=0.5) is still trained first
    plain = model_points(
        "bm3", "full", values={"n_layers": [2, 3], "dropout": [0.3], "reg_weight": [0.1]}
    )
    assert plain[0] == {"n_layers": 1, "dropout": 0.5, "reg_weight": 0.1} and len(plain) == 3
    for bad in ([], "2", None):
        with pytest.raises(ConfigError, match=r"bm3\.n_layers"):
            model_grid("bm3", {"n_layers": bad})
    with pytest.raises(ConfigError, match="no default value"):
        model_points("bm3", values={"no_such_key": [1]})
    # training keys have defaults too (cm3_pyg/training/defaults.yaml)
    lr = model_points("bprmf", "full", values={"reg_weight": [0.001], "learning_rate": [0.01]})
    assert lr == [
        {"reg_weight": 0.001, "learning_rate": 0.001},
        {"reg_weight": 0.001, "learning_rate": 0.01},
    ]


def test_run_comparison_trains_the_widened_grid_and_checks_the_model_names(tiny, tmp_path):
    calls = []
    run_comparison(
        tiny,
        ["lightgcn", "bprmf"],
        [1, 2],
        tmp_path,
        grid_mode="full",
        overrides={"reg_weight": 0.01},
        model_grid_values={"lightgcn": {"n_layers": [2, 4], "reg_weight": [0.01]}},
        runner=recording_runner(calls),
    )
    lightgcn = [(c["n_layers"], c["reg_weight"], c["seed"]) for n, c, _ in calls if n == "lightgcn"]
    default_layers = get_model_class("lightgcn").default_config()["n_layers"]
    assert default_layers not in (2, 4)
    assert lightgcn == [
        (layers, 0.01, seed) for layers in (default_layers, 2, 4) for seed in (1, 2)
    ]
    bprmf = [c["reg_weight"] for n, c, _ in calls if n == "bprmf"]
    assert bprmf[:2] == [0.01, 0.01]  # the override is BPR-MF's default point too
    assert len(bprmf) == 2 * len(get_model_class("bprmf").default_grid()["reg_weight"])
    with pytest.raises(ConfigError, match="grid values given for models that are not compared"):
        run_comparison(tiny, ["bprmf"], [1], tmp_path, model_grid_values={"bm3": {"n_layers": [2]}})


def test_grid_values_argument_parsing():
    from cm3_pyg.cli.compare import _describe_grid_values, parse_grid_values

    parsed = parse_grid_values(["BM3.n_layers=[2, 3, 4]", "bm3.dropout=0.3", "vbpr.reg_weight=[5]"])
    assert parsed == {"bm3": {"n_layers": [2, 3, 4], "dropout": [0.3]}, "vbpr": {"reg_weight": [5]}}
    assert _describe_grid_values(parsed) == (
        "bm3: n_layers=[2, 3, 4], dropout=[0.3]; vbpr: reg_weight=[5]"
    )
    for bad in ("n_layers=[2]", "bm3.n_layers", "bm3.=[1]", "bm3.n_layers=[]", "bm3.x=[1, ["):
        with pytest.raises(ValueError, match="--grid-values"):
            parse_grid_values([bad])


# --- significance ----------------------------------------------------------------------------


def _users_file(folder, values_by_metric):
    users = torch.arange(len(next(iter(values_by_metric.values()))))
    table = PerUserMetrics(
        users, {k: torch.tensor(v, dtype=torch.float64) for k, v in values_by_metric.items()}
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_user_metrics(folder / TEST_USERS_NAME, table, [f"u{u}" for u in users.tolist()])


def _crafted_records(tmp_path, shifts, seeds=(1, 2, 3), users=400, skip=()):
    """Records of models whose per-user metric is a shared base plus ``shifts[model]`` plus
    seeded noise, with their ``test_users.csv`` written (except for models in ``skip``)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(users, generator=gen, dtype=torch.float64) * 0.5
    records = []
    for model, shift in shifts.items():
        for seed in seeds:
            values = (base + shift + 0.05 * torch.randn(users, generator=gen)).clamp(0, 1)
            folder = tmp_path / model / f"seed{seed}"
            metrics = {
                key: values.tolist() for key in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
            }
            if model not in skip:
                _users_file(folder, metrics)
            rec = record(model, {}, seed, valid=0.1, test=float(values.mean()))
            rec.path = str(folder)
            records.append(rec)
    return records


def test_a_first_claim_needs_a_significant_lead(tmp_path):
    records = _crafted_records(tmp_path / "clear", {"a": 0.05, "b": 0.0, "c": 0.001})
    selected = select_best(summarize(records))
    report = significance(selected, records, randomization_samples=500)
    assert report.num_users == 400 and report.seed_list == [1, 2, 3]
    assert [(t.a, t.b) for t in report.users["recall@20"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    means = {m: s.test_mean["recall@20"] for m, s in selected.items()}
    leader, significant, _ = report.first("recall@20", means)
    assert (leader, significant) == ("a", True)
    paths = write_results(tmp_path / "out", summarize(records), selected, significance=report)
    md = paths[0].read_text()
    assert "- test R@20: **a is first**, significantly above every other model" in md
    rows = {r["model"]: r for r in csv.DictReader(paths[1].open())}
    assert rows["a"]["test_recall@20_p_holm_vs_best"] == ""
    assert float(rows["b"]["test_recall@20_p_holm_vs_best"]) < 0.05
    assert float(rows["b"]["test_recall@20_effect_dz_vs_best"]) < 0  # b lies below a
    assert len(list(csv.DictReader(paths[3].open()))) == 3 * 4 * 2  # pairs x metrics x over

    # two models level with each other: the higher mean is no "first"
    level = _crafted_records(tmp_path / "level", {"a": 0.0005, "b": 0.0})
    chosen = select_best(summarize(level))
    report = significance(chosen, level, randomization_samples=500)
    leader, significant, closest = report.first(
        "recall@20", {m: s.test_mean["recall@20"] for m, s in chosen.items()}
    )
    assert not significant and closest is not None and closest.p_adjusted > 0.05
    md = write_results(tmp_path / "out2", summarize(level), chosen, significance=report)[0]
    assert f"{leader} has the highest mean but is **not significantly first**" in md.read_text()


def test_models_without_per_user_files_are_named_not_tested(tmp_path):
    records = _crafted_records(tmp_path, {"a": 0.05, "b": 0.0, "old": 0.0}, skip=("old",))
    selected = select_best(summarize(records))
    report = significance(selected, records, randomization_samples=100)
    assert any(note.startswith("old: its runs have no test_users.csv") for note in report.notes)
    tested = {t.a for t in report.users["recall@20"]} | {t.b for t in report.users["recall@20"]}
    assert tested == {"a", "b"}
    # over seeds every model is still tested (from metrics.json)
    assert len(report.seeds["recall@20"]) == 3
    leader, significant, _ = report.first(
        "recall@20", {m: selected[m].test_mean["recall@20"] for m in ("a", "b")}
    )
    assert leader == "a" and significant


def test_user_metrics_file_errors_name_the_row_and_field(tmp_path):
    path = tmp_path / TEST_USERS_NAME
    path.write_text("user,user_id,recall@20\n0,u0,0.5\n1,u1,abc\n")
    with pytest.raises(DataFormatError, match=r"row 3, recall@20: not a number \('abc'\)"):
        read_user_metrics(path)
    path.write_text("user,user_id,recall@20\nx,u0,0.5\n")
    with pytest.raises(DataFormatError, match="row 2, user: not an integer"):
        read_user_metrics(path)
    path.write_text("who,recall\n")
    with pytest.raises(DataFormatError, match="expected a header"):
        read_user_metrics(path)
    with pytest.raises(DataFormatError, match="cannot read per-user metrics"):
        read_user_metrics(tmp_path / "absent.csv")


# --- grids shared between processes, and selected runs completed ---------------------------------


def test_shards_split_the_plan_into_disjoint_interleaved_parts(tiny, tmp_path, monkeypatch):
    grid = {"n_layers": [1, 2], "reg_weight": [0.1, 0.01]}
    monkeypatch.setattr(get_model_class("bm3"), "default_grid", classmethod(lambda c: grid))

    def valid(c):  # the combined point (2 layers, reg 0.01) is a new one
        return 0.1 + 0.01 * (c["n_layers"] == 2) + 0.02 * (c["reg_weight"] == 0.01)

    def runs(calls):
        return [tuple(sorted(c.items())) for _, c, _ in calls]

    kwargs = {"grid_mode": "coordinate", "reuse": False}
    full = []
    run_comparison(tiny, ["bm3"], [1, 2], tmp_path, runner=recording_runner(full, valid), **kwargs)
    plan = runs(full)
    assert len(plan) == 8  # 3 small-grid points and the combined one, two seeds each
    parts = []
    for k in (1, 2, 3):
        calls = []
        records = run_comparison(
            tiny,
            ["bm3"],
            [1, 2],
            tmp_path,
            shard=(k, 3),
            runner=recording_runner(calls, valid),
            **kwargs,
        )
        assert len(records) == len(calls)
        parts.append(runs(calls))
    # every run before the coordinate step exactly once, shard k holding runs k, k+3, ...
    for k, part in enumerate(parts):
        assert part == plan[:6][k::3]
    assert sorted(x for part in parts for x in part) == sorted(plan[:6])
    for bad in ((0, 2), (3, 2), (1, 0)):
        with pytest.raises(ConfigError, match="shard"):
            run_comparison(tiny, ["bprmf"], [1], tmp_path, shard=bad, runner=recording_runner([]))


def test_shard_argument_parsing(tmp_path, capsys):
    from cm3_pyg.cli.compare import main

    for bad in ("2", "0/2", "3/2", "a/b"):
        with pytest.raises(SystemExit):
            main(["--shard", bad, "--out", str(tmp_path)])
        assert "--shard: expected K/N" in capsys.readouterr().err
    # a shard trains its runs and writes no results; a last call reuses them and writes them
    common = [
        "--models",
        "bprmf",
        "--seeds",
        "5,6",
        "--budget",
        "2",
        "--epochs",
        "1",
        "--synthetic-size",
        "120,80",
        "--out",
        str(tmp_path),
    ]
    assert main([*common, "--shard", "2/2"]) == 0
    runs = sorted(p.parent.name + "/" + p.name for p in (tmp_path / "runs").glob("*/*/seed*"))
    assert len(runs) == 2 and not (tmp_path / "results.md").exists()
    assert main([*common, "--shard", "1/2"]) == 0
    assert len(list((tmp_path / "runs").glob("*/*/seed*/metrics.json"))) == 4
    assert main(common) == 0
    assert "| bprmf |" in (tmp_path / "results.md").read_text()


def test_selected_runs_missing_their_per_user_files_are_retrained_identically(tiny, tmp_path):
    from cm3_pyg.experiments import complete_selected_runs

    kwargs = {"budget": 2, "epochs": 1, "overrides": {"train_batch_size": 1024}}
    records = run_comparison(tiny, ["bprmf"], [3, 4], tmp_path, dataset_name="tiny", **kwargs)
    selected = select_best(summarize(records))
    chosen = [r for r in records if r.slug == selected["bprmf"].slug]
    other = next(r for r in records if r.slug != selected["bprmf"].slug)
    before = {r.seed: (tmp_path / r.path / TEST_USERS_NAME).read_text() for r in chosen}
    # a grid kept in a durable place keeps only metrics.json of every run
    for r in records:
        for name in (TEST_USERS_NAME, "artifact.pt", "epochs.csv"):
            (tmp_path / r.path / name).unlink()
    retrained = []

    def count(data, name, config, out_dir, **kw):
        retrained.append((name, config["seed"], str(out_dir)))
        return run_experiment(data, name, config, out_dir=out_dir, **kw)

    again = run_comparison(
        tiny,
        ["bprmf"],
        [3, 4],
        tmp_path,
        dataset_name="tiny",
        runner=recording_runner([], valid=lambda c: math.nan),
        **kwargs,
    )
    assert [r.valid for r in again] == [r.valid for r in records]  # reused, not trained
    completed, notes = complete_selected_runs(
        tiny, selected, again, dataset_name="tiny", runner=count
    )
    assert sorted(seed for _, seed, _ in retrained) == [3, 4]
    assert {path for _, _, path in retrained} == {r.path for r in chosen}
    for r in chosen:
        assert (tmp_path / r.path / TEST_USERS_NAME).read_text() == before[r.seed]
        assert (tmp_path / r.path / "artifact.pt").exists()
    assert not (tmp_path / other.path / TEST_USERS_NAME).exists()  # not selected: left as is
    assert len(notes) == 2 and all("difference +0.00e+00" in n for n in notes)
    assert [r.test for r in completed] == [r.test for r in records]
    # complete now: nothing more to retrain
    assert (
        complete_selected_runs(tiny, selected, completed, dataset_name="tiny", runner=count)[1]
        == []
    )
    # a run saved on other content is refused, naming its metrics.json
    (tmp_path / chosen[0].path / TEST_USERS_NAME).unlink()
    changed = tiny.clone()
    store = changed["user", "rates", "item"]
    store.test_edge_index = store.test_edge_index[:, 1:]
    with pytest.raises(DataFormatError, match="metrics.json: made on dataset 'tiny'"):
        complete_selected_runs(changed, selected, completed, dataset_name="tiny", runner=count)


def test_a_run_saved_before_a_key_existed_is_reused_while_that_key_is_at_its_default(
    tiny, tmp_path
):
    kwargs = {"budget": 1, "epochs": 1, "dataset_name": "tiny"}
    (record,) = run_comparison(tiny, ["bprmf"], [7], tmp_path, **kwargs)
    file = tmp_path / record.path / "metrics.json"
    saved = json.loads(file.read_text())
    del saved["config"]["lr_decay"]  # as written before the key was added
    file.write_text(json.dumps(saved))
    calls = []
    (again,) = run_comparison(
        tiny, ["bprmf"], [7], tmp_path, runner=recording_runner(calls), **kwargs
    )
    assert calls == [] and again.valid == record.valid  # 1.0 is the default: reused
    # another value of the key the run predates, or a key the current config lacks: retrain
    run_comparison(
        tiny,
        ["bprmf"],
        [7],
        tmp_path,
        runner=recording_runner(calls),
        overrides={"lr_decay": 0.5},
        **kwargs,
    )
    assert len(calls) == 1
    saved["config"]["no_such_key"] = 1
    (tmp_path / record.path / "metrics.json").write_text(json.dumps(saved))
    run_comparison(tiny, ["bprmf"], [7], tmp_path, runner=recording_runner(calls), **kwargs)
    assert len(calls) == 2
