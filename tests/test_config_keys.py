"""Config keys checked with the key named, and every CLI error on one line."""

from __future__ import annotations

import pytest

from cm3_pyg.cli import main
from cm3_pyg.errors import ConfigError
from cm3_pyg.models import CM3
from cm3_pyg.training import load_config


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2, 3], r"'modality_weights': weights must be a mapping of modality name to weight"),
        (
            {"image": -1, "text": 1},
            r"'modality_weights': weights\['image'\] must be finite and >= 0",
        ),
        ({"image": 0, "text": 0}, "'modality_weights': weights must not all be zero"),
        ({}, "'modality_weights': weights is empty"),
    ],
)
def test_modality_weights_are_checked_with_the_key_named(value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CM3.default_config(), overrides={"modality_weights": value})


def test_mm_image_weight_names_its_key() -> None:
    with pytest.raises(
        ConfigError, match=r"'mm_image_weight' must be null or a number in \[0, 1\]"
    ):
        load_config(CM3.default_config(), overrides={"mm_image_weight": 2.0})


def test_unknown_modality_weight_names_the_key(tmp_path, capsys) -> None:
    argv = ["--model", "cm3", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r")]
    assert main([*argv, "--set", "modality_weights={a: 1}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: config key 'modality_weights': weights names unknown modality")


def test_a_multi_line_yaml_error_is_one_error_line(tmp_path, capsys) -> None:
    argv = ["--model", "cm3", "--no-progress", "--out", str(tmp_path / "r")]
    assert main([*argv, "--set", "alpha=0\x1f"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "error: --set 'alpha=0\\x1f': value is not valid"
    )


@pytest.mark.parametrize("key", ["learning_rate", "epochs", "topk", "device", "gamma"])
def test_null_is_refused_where_the_default_is_a_value(key) -> None:
    # found by the train-values CLI fuzz: learning_rate=null reached `None > 0`
    with pytest.raises(ConfigError, match=rf"key '{key}' expects an? .* got None"):
        load_config(CM3.default_config(), overrides={key: None})


def test_null_is_accepted_where_the_default_is_null() -> None:
    from cm3_pyg.models import SEA

    config = load_config(SEA.default_config(), overrides={"club_lr": None, "objective": None})
    assert config["club_lr"] is None and config["objective"] is None
