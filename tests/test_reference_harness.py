"""The reference-timing harness (benchmarks/reference_cm3.py), without running the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.reference_cm3 import check_reference_dir, time_reference
from benchmarks.scales import MMREC_FEATURE_DIMS, generated_features


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
    with pytest.raises(FileNotFoundError, match="with model 'CM3'"):
        check_reference_dir(tmp_path)
    (tmp_path / "src" / "models" / "cm3.py").write_text("")
    assert check_reference_dir(tmp_path) == tmp_path.resolve()


def test_model_file_is_matched_without_regard_to_case(tmp_path: Path) -> None:
    from benchmarks.reference_cm3 import reference_model_file

    (tmp_path / "src" / "models").mkdir(parents=True)
    (tmp_path / "src" / "models" / "SEA.py").write_text("")  # as bruno686/SEA ships it
    assert reference_model_file(tmp_path, "SEA").name == "SEA.py"
    with pytest.raises(FileNotFoundError, match="with model 'BM3'"):
        reference_model_file(tmp_path, "BM3")


def test_bad_scale_and_epochs_are_rejected_before_running(tmp_path: Path) -> None:
    (tmp_path / "src" / "models").mkdir(parents=True)
    (tmp_path / "src" / "models" / "cm3.py").write_text("")
    with pytest.raises(ValueError, match="scale"):
        time_reference(str(tmp_path), "sports")
    with pytest.raises(ValueError, match="epochs"):
        time_reference(str(tmp_path), "tiktok", epochs=0)


def test_generated_features_shapes_dtype_and_determinism() -> None:
    # The one generator both sides of the baby benchmark load (reference and ours).
    feats = generated_features(50, MMREC_FEATURE_DIMS, seed=7)
    image, text = feats["image"], feats["text"]
    assert image.shape == (50, 4096) and text.shape == (50, 384)
    assert image.dtype == np.float32 and text.dtype == np.float32
    again = generated_features(50, MMREC_FEATURE_DIMS, seed=7)
    assert all(np.array_equal(feats[m], again[m]) for m in feats)
    other = generated_features(50, MMREC_FEATURE_DIMS, seed=8)
    assert not np.array_equal(image, other["image"])
    # roughly standard normal, drawn image first from one default_rng(seed)
    assert abs(float(image.mean())) < 0.05 and abs(float(image.std()) - 1.0) < 0.05
    rng = np.random.default_rng(7)
    assert np.array_equal(image, rng.standard_normal((50, 4096), dtype=np.float32))


def test_user_graph_dict_counts_shared_training_items(tmp_path: Path) -> None:
    from benchmarks.reference_cm3 import user_graph_dict

    rows = [  # (user, item, x_label); the valid/test rows must not count
        (0, 0, 0),
        (0, 1, 0),
        (0, 2, 0),
        (1, 0, 0),
        (1, 1, 0),
        (2, 2, 0),
        (2, 1, 1),
        (3, 3, 0),
        (1, 1, 0),  # a duplicate row counts once
    ]
    inter = tmp_path / "x.inter"
    inter.write_text("userID\titemID\tx_label\n" + "".join(f"{u}\t{i}\t{x}\n" for u, i, x in rows))
    graph = user_graph_dict(inter, top=1)
    # brute force: users sharing distinct training items
    items = {u: {i for uu, i, x in rows if uu == u and x == 0} for u in range(4)}
    for user in range(4):
        shared = {v: len(items[user] & items[v]) for v in range(4) if v != user}
        best = max(shared.values())
        neighbours, counts = graph[user]
        if best == 0:
            assert neighbours == [] and counts == []
        else:
            assert counts == [float(best)] and shared[neighbours[0]] == best
    assert graph[0] == [[1], [2.0]]
