"""Configuration: training defaults <- model YAML <- user YAML file <- ``--set`` overrides.

Keys use MMRec's names (``embedding_size``, ``n_ui_layers``, ``learning_rate``, ...). Every
layer may only set keys the defaults know, with a value of a compatible type, so a typo
fails loudly instead of being ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from cm3_pyg.checks import type_noun
from cm3_pyg.data.graphs import modality_weights
from cm3_pyg.errors import ConfigError
from cm3_pyg.metrics import METRIC_NAMES
from cm3_pyg.nn.objectives import REDUCTIONS, objective_names
from cm3_pyg.nn.optim import OPTIMIZERS
from cm3_pyg.nn.precision import check_precision
from cm3_pyg.nn.sparse import check_backend
from cm3_pyg.training.sampler import NEGATIVE_POOLS

TRAINING_DEFAULTS = Path(__file__).with_name("defaults.yaml")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; expected a YAML config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}"
        )
    return loaded


def training_defaults() -> dict[str, Any]:
    """The shared training/evaluation defaults (``training/defaults.yaml``)."""
    return _read_yaml(TRAINING_DEFAULTS)


def _compatible(default: Any, value: Any) -> bool:
    # A key whose default is null takes any value (its own check follows); a key with a
    # value by default never takes null (``--set learning_rate=`` would reach arithmetic).
    if default is None:
        return True
    if value is None:
        return False
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def merge_config(base: Mapping[str, Any], layer: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``base`` updated with ``layer``.

    Unknown keys and wrong types raise :class:`ConfigError` naming ``source``.
    """
    merged = dict(base)
    for key, value in layer.items():
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"{source}: unknown config key {key!r} (known keys: {known})")
        if isinstance(base[key], float) and isinstance(value, str) and _FLOAT.fullmatch(value):
            # YAML 1.1 reads "1e-3" (no dot, no exponent sign) as a string; accept it.
            value = float(value)
        if not _compatible(base[key], value):
            raise ConfigError(
                f"{source}: key {key!r} expects {type_noun(type(base[key]).__name__)} "
                f"(like the default {base[key]!r}), got {value!r}"
            )
        if isinstance(base[key], float) and isinstance(value, int):
            value = float(value)
        merged[key] = value
    return merged


def parse_overrides(
    pairs: Iterable[str], flag: str = "--set", form: str = "key=value"
) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are YAML (``3``, ``0.5``, ``[5, 10]``).

    ``flag`` and ``form`` name the option and its expected shape in error messages (other
    options of the same ``key=YAML`` syntax reuse this parser).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected {form}")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{flag} {pair!r}: value is not valid YAML ({exc})") from None
    return out


def load_config(
    model_defaults: Mapping[str, Any],
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The effective configuration of one run.

    Args:
        model_defaults: the model's YAML defaults (``Model.default_config()``); they may add
            model-specific keys and override the training defaults.
        config_file: optional user YAML file.
        overrides: optional ``{key: value}`` (e.g. from :func:`parse_overrides`).
    """
    config = training_defaults()
    config.update(model_defaults)
    if config_file is not None:
        config = merge_config(config, _read_yaml(config_file), str(config_file))
    if overrides:
        config = merge_config(config, overrides, "--set")
    validate_config(config)
    return config


def validate_config(config: Mapping[str, Any]) -> None:
    """Range checks that types alone cannot express (``config`` is a complete one, as
    :func:`load_config` returns)."""
    for key, value in config.items():
        # YAML spells NaN/Inf as .nan/.inf; no key accepts them.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    modalities = config["modalities"]
    if modalities is not None and (
        not isinstance(modalities, list)
        or not all(isinstance(m, str) and m for m in modalities)
        or len(set(modalities)) != len(modalities)
    ):
        raise ConfigError(
            f"config key 'modalities' must be null or a list of distinct names, got {modalities!r}"
        )
    positive_ints = (
        "epochs",
        "train_batch_size",
        "eval_batch_size",
        "embedding_size",
        "knn_k",
        "num_negatives",
        "flip_dim",
    )
    for key in positive_ints:
        if key in config and not (isinstance(config[key], int) and config[key] > 0):
            raise ConfigError(f"config key {key!r} must be a positive integer, got {config[key]!r}")
    seed = config["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"config key 'seed' must be an integer in [0, 2**32), got {seed!r}")
    if config["stopping_step"] < 0:
        raise ConfigError(
            f"config key 'stopping_step' must be >= 0, got {config['stopping_step']!r}"
        )
    if not config["learning_rate"] > 0:
        raise ConfigError(
            f"config key 'learning_rate' must be > 0, got {config['learning_rate']!r}"
        )
    try:
        check_backend(str(config["sparse_backend"]))
    except ValueError as exc:
        raise ConfigError(f"config key 'sparse_backend': {exc}") from None
    try:
        device = torch.device(str(config["device"]))
    except RuntimeError as exc:
        raise ConfigError(f"config key 'device': {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' is {str(device)!r} but CUDA is not available")
    try:
        check_precision(str(config["precision"]), device)
    except ValueError as exc:
        raise ConfigError(f"config key 'precision': {exc}") from None
    duplicates = config["duplicate_interactions"]
    if duplicates not in ("warn", "error"):
        raise ConfigError(
            f"config key 'duplicate_interactions' must be 'warn' or 'error', got {duplicates!r}"
        )
    topk = config["topk"]
    if not topk or not all(isinstance(k, int) and k > 0 for k in topk):
        raise ConfigError(f"config key 'topk' must be a list of positive integers, got {topk!r}")
    for key, allowed in (
        ("loss_reduction", REDUCTIONS),
        ("negative_pool", NEGATIVE_POOLS),
        ("optimizer", OPTIMIZERS),
    ):
        if config[key] not in allowed:
            raise ConfigError(
                f"config key {key!r} must be one of {list(allowed)}, got {config[key]!r}"
            )
    if not 0.0 < config["lr_decay"] <= 1.0:
        raise ConfigError(f"config key 'lr_decay' must lie in (0, 1], got {config['lr_decay']!r}")
    if not 0.0 <= config["cold_items"] < 1.0:
        raise ConfigError(
            f"config key 'cold_items' must lie in [0, 1), got {config['cold_items']!r}"
        )
    image_weight = config["mm_image_weight"]
    if image_weight is not None and not (
        isinstance(image_weight, (int, float))
        and not isinstance(image_weight, bool)
        and 0.0 <= image_weight <= 1.0
    ):
        raise ConfigError(
            f"config key 'mm_image_weight' must be null or a number in [0, 1], got {image_weight!r}"
        )
    weights = config["modality_weights"]
    if weights is not None:
        # The values by the weighting rule itself; the names are checked against the data
        # when the graphs are built.
        named = list(weights) if isinstance(weights, Mapping) else []
        try:
            modality_weights(named, weights)
        except ConfigError as exc:
            raise ConfigError(f"config key 'modality_weights': {exc}") from None
    for key in ("weight_decay", "flip_weight_decay"):
        if config[key] < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {config[key]!r}")
    objective = config["objective"]
    if objective is not None and objective not in objective_names():
        raise ConfigError(
            f"config key 'objective' must be null or one of {objective_names()}, got {objective!r}"
        )
    metric = str(config["valid_metric"]).lower()
    name, _, k = metric.partition("@")
    if name not in METRIC_NAMES or not k.isdigit() or int(k) not in topk:
        raise ConfigError(
            f"config key 'valid_metric' must be <{'|'.join(METRIC_NAMES)}>@k "
            f"with k in topk {topk}, "
            f"got {config['valid_metric']!r}"
        )
