"""The zoo speed harness's configuration rule (benchmarks/zoo_speed.py), without references."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import zoo_speed
from benchmarks.zoo_speed import REFERENCES, SHARED_KEYS, our_config, reference_config
from cm3_pyg.models import available_models


def _checkout(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / "src" / "configs" / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return tmp_path


def test_every_built_in_model_but_directau_has_a_reference():
    import cm3_pyg.models

    # the built-in models: one YAML each beside their file (tests may register plugins)
    built_in = {f.stem for f in Path(cm3_pyg.models.__file__).parent.glob("*.yaml")}
    assert built_in <= set(available_models())
    assert set(REFERENCES) == built_in - {"directau"}


def test_grid_keys_take_our_values_and_reference_only_keys_their_first(tmp_path):
    checkout = _checkout(
        tmp_path,
        "FREEDOM",
        "dropout: [0.9, 0.8]\nreg_weight: [0.0, 1e-05]\nunknown_axis: [7, 8]\n"
        "weight_size: [64, 64]\nhyper_parameters: ['dropout', 'reg_weight', 'unknown_axis']\n",
    )
    ours = our_config("freedom")
    config = reference_config("freedom", checkout)
    assert config["dropout"] == ours["dropout"] and config["reg_weight"] == ours["reg_weight"]
    assert config["unknown_axis"] == 7
    assert "weight_size" not in config  # a list, but not a grid key: the YAML's own value
    assert all(config[key] == ours[key] for key in SHARED_KEYS)
    assert config["hyper_parameters"] == ["seed"]


def test_a_missing_model_yaml_is_named(tmp_path):
    _checkout(tmp_path, "Other", "a: 1\n")
    with pytest.raises(FileNotFoundError, match="no YAML of model BM3"):
        reference_config("bm3", tmp_path)


def test_the_table_shows_the_huge_page_reference_only_when_timed():
    row = {
        "scale": "baby",
        "model": "bm3",
        "reference_model": "MMRec/BM3",
        "reference_epoch_seconds": [4.0, 6.0],
        "reference_median": 5.0,
        "ours_epoch_seconds": [2.0, 2.0],
        "ours_median": 2.0,
        "ratio": 0.4,
    }
    plain = zoo_speed.markdown([row])
    assert "huge pages" not in plain
    assert plain.splitlines()[-1] == (
        "| baby | bm3 | MMRec/BM3 | 5.00 (4.00, 6.00) | 2.00 (2.00, 2.00) | 0.400 |"
    )
    both = dict(row, reference_thp_epoch_seconds=[3.0, 5.0], reference_thp_median=4.0)
    both["ratio_thp"] = 2.0 / 4.0
    table = zoo_speed.markdown([both, row]).splitlines()
    assert "huge pages" in table[0] and table[1].count("|") == table[0].count("|")
    assert table[2].endswith("| 0.400 | 4.00 (3.00, 5.00) | 0.500 |")
    assert table[3].endswith("| 0.400 | | |")  # a row without that run keeps the columns


def test_an_unknown_huge_page_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reference_huge_pages"):
        zoo_speed.sitting(["bm3"], ["baby"], tmp_path, 1, None, None, None, None, None, "yes")
