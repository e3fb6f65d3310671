"""The reference-timing harness (benchmarks/reference_cm3.py), without running the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.reference_cm3 import (
    BABY_FEATURE_DIMS,
    check_reference_dir,
    generated_features,
    time_reference,
)


def test_missing_reference_dir_names_path_and_expectation(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkout"
    with pytest.raises(FileNotFoundError) as info:
        time_reference(str(missing), "tiktok", epochs=1)
    msg = str(info.value)
    assert str(missing) in msg
    assert "src/models/cm3.py" in msg.replace("\\", "/")


def test_reference_dir_without_model_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "src" / "models").mkdir(parents=True)
    (tmp_path / "src" / "main.py").write_text("")
    with pytest.raises(FileNotFoundError, match="not a checkout of the CM3 reference"):
        check_reference_dir(tmp_path)
    (tmp_path / "src" / "models" / "cm3.py").write_text("")
    assert check_reference_dir(tmp_path) == tmp_path.resolve()


def test_bad_scale_and_epochs_are_rejected_before_running(tmp_path: Path) -> None:
    (tmp_path / "src" / "models").mkdir(parents=True)
    (tmp_path / "src" / "models" / "cm3.py").write_text("")
    with pytest.raises(ValueError, match="scale"):
        time_reference(str(tmp_path), "sports")
    with pytest.raises(ValueError, match="epochs"):
        time_reference(str(tmp_path), "tiktok", epochs=0)


def test_generated_features_shapes_dtype_and_determinism() -> None:
    image, text = generated_features(50, BABY_FEATURE_DIMS, seed=7)
    assert image.shape == (50, 4096) and text.shape == (50, 384)
    assert image.dtype == np.float32 and text.dtype == np.float32
    again = generated_features(50, BABY_FEATURE_DIMS, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((image, text), again, strict=True))
    other = generated_features(50, BABY_FEATURE_DIMS, seed=8)
    assert not np.array_equal(image, other[0])
    # roughly standard normal
    assert abs(float(image.mean())) < 0.05 and abs(float(image.std()) - 1.0) < 0.05


def test_generated_features_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        generated_features(0, (4, 3))
    with pytest.raises(ValueError):
        generated_features(5, (4, 0))


def test_generated_features_match_our_benchmark_side() -> None:
    """Both sides of the baby benchmark must load the very same features."""
    scales = pytest.importorskip("benchmarks.scales")
    ours = getattr(scales, "generated_features", None)
    if ours is None:
        pytest.skip("benchmarks.scales has no generated_features")
    mine = generated_features(30, BABY_FEATURE_DIMS, seed=5)
    theirs = ours(30, {"image": BABY_FEATURE_DIMS[0], "text": BABY_FEATURE_DIMS[1]}, 5)
    assert all(np.array_equal(a, b) for a, b in zip(mine, theirs.values(), strict=True))
