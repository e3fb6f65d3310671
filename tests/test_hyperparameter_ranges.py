"""Every numeric hyper-parameter of every model has a declared range, checked on
construction (ValueError naming the argument) and on a config (ConfigError naming the key,
before any data is read)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from cm3_pyg.checks import Range
from cm3_pyg.cli import main
from cm3_pyg.errors import ConfigError
from cm3_pyg.models import CM3, registered_models
from cm3_pyg.models.base import CONFIG_KEYS, SIZE_ARGUMENTS, _init_parameters

MODELS = sorted(registered_models().items())


def _numeric(cls: type) -> list[inspect.Parameter]:
    return [
        p
        for p in _init_parameters(cls)
        if str(p.annotation).split("|")[0].strip() in ("int", "float")
    ]


def _sizes(cls: type) -> dict[str, Any]:
    sizes = {"num_users": 12, "num_items": 9, "feature_dims": [6, 4]}
    wanted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in sizes.items() if k in wanted and k in SIZE_ARGUMENTS}


def _outside(bounds: Range, integer: bool) -> list[float]:
    """A value just beyond each finite end of ``bounds``."""
    step = 1 if integer else 1e-3
    out = []
    if bounds.minimum is not None:
        out.append(bounds.minimum if bounds.exclusive_minimum else bounds.minimum - step)
    if bounds.maximum is not None:
        out.append(bounds.maximum if bounds.exclusive_maximum else bounds.maximum + step)
    return out


@pytest.mark.parametrize(("name", "cls"), MODELS)
def test_every_numeric_hyperparameter_has_a_range(name: str, cls: type) -> None:
    missing = [p.name for p in _numeric(cls) if p.name not in cls.ranges()]
    assert not missing, f"{name}: no hyperparameter_ranges entry for {missing}"


@pytest.mark.parametrize(("name", "cls"), MODELS)
def test_every_string_hyperparameter_has_choices(name: str, cls: type) -> None:
    strings = [p for p in _init_parameters(cls) if str(p.annotation).split("|")[0].strip() == "str"]
    choices = cls.choices()
    missing = [p.name for p in strings if p.name not in choices]
    assert not missing, f"{name}: no hyperparameter_choices entry for {missing}"
    for param in strings:
        assert param.default in choices[param.name]
        with pytest.raises(ValueError, match=rf"{cls.__name__}: {param.name} must be one of"):
            cls(**_sizes(cls), **{param.name: "no-such-choice"})
        key = CONFIG_KEYS.get(param.name, param.name)
        with pytest.raises(ConfigError, match=rf"config key '{key}' must be one of"):
            cls.check_config({key: "no-such-choice"})


def test_a_string_choice_is_refused_before_reading_data(tmp_path, capsys) -> None:
    argv = ["--model", "bprmf", "--data-root", str(tmp_path / "absent"), "--no-progress"]
    code = main([*argv, "--out", str(tmp_path / "run"), "--set", "init_scheme=normal"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "error: model 'bprmf': config key 'init_scheme' must be one of "
        "('xavier_normal', 'uniform'), got 'normal'"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("name", "cls"), MODELS)
def test_defaults_lie_inside_and_values_outside_are_refused(name: str, cls: type) -> None:
    ranges = cls.ranges()
    defaults = {p.name: p.default for p in _init_parameters(cls)}
    cls.check_hyperparameters(defaults)  # the defaults are valid
    for param in _numeric(cls):
        integer = str(param.annotation).startswith("int")
        for bad in _outside(ranges[param.name], integer):
            bad = int(bad) if integer else bad
            with pytest.raises(ValueError, match=rf"{cls.__name__}: {param.name} must be"):
                cls(**_sizes(cls), **{param.name: bad})
            key = CONFIG_KEYS.get(param.name, param.name)
            with pytest.raises(ConfigError, match=rf"config key '{key}' must be"):
                cls.check_config({key: bad})


@pytest.mark.parametrize(("name", "cls"), MODELS)
def test_an_int_hyperparameter_refuses_a_fraction(name: str, cls: type) -> None:
    param = next(p for p in _numeric(cls) if str(p.annotation) == "int")
    with pytest.raises(TypeError, match=rf"{param.name} must be an int, got 1.5"):
        cls(**_sizes(cls), **{param.name: 1.5})


def test_cross_key_constraint_names_both_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"'min_sim' \(0.9\) must not exceed config key 'max_sim'"
    ):
        CM3.check_config({"min_sim": 0.9, "max_sim": 0.5})
    # against the other key's default when only one is given
    with pytest.raises(ConfigError, match="must not exceed"):
        CM3.check_config({"max_sim": -0.5})
    with pytest.raises(ValueError, match=r"CM3: min_sim \(0.5\) must not exceed CM3: max_sim"):
        CM3(4, 4, [3], min_sim=0.5, max_sim=0.2)


def test_a_subclass_is_checked_with_its_own_ranges() -> None:
    class StrictCM3(CM3):  # no own __init__, one range narrowed, not registered
        name = ""
        hyperparameter_ranges = {"gamma": Range(0, 1)}

    assert StrictCM3.ranges()["gamma"] == Range(0, 1)
    assert StrictCM3.ranges()["alpha"] == CM3.ranges()["alpha"]  # inherited
    with pytest.raises(ValueError, match="StrictCM3: gamma must be in"):
        StrictCM3(4, 4, [3], gamma=1.5)
    CM3(4, 4, [3], gamma=1.5)  # the base's range allows it


def test_the_cli_refuses_a_bad_value_before_reading_data(tmp_path, capsys) -> None:
    argv = ["--model", "cm3", "--data-root", str(tmp_path / "absent"), "--no-progress"]
    code = main([*argv, "--out", str(tmp_path / "run"), "--set", "gamma=-1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: model 'cm3': config key 'gamma' must be >= 0, got -1"
    assert not (tmp_path / "run").exists()
