"""Bad input of every kind -> the project's own error naming file, line/row/key.

Complements test_data_loading.py (header/row/feature-file errors of the readers) and
test_training.py (basic config errors) with: duplicates, empty splits, users only in
valid/test, out-of-range items with their line, the collect-everything ``validate``
command, config type/range errors, unsafe pickles in caches and checkpoints, and every
malformed checkpoint.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cm3_pyg import cli
from cm3_pyg.data import MMRecDataset, read_mmrec_folder
from cm3_pyg.data.mmrec import check_interactions, read_interactions, scan_interactions
from cm3_pyg.data.problems import ProblemLog
from cm3_pyg.data.synthetic import make_synthetic_arrays, write_mmrec_folder
from cm3_pyg.data.validate import main as validate_main
from cm3_pyg.data.validate import validate_folder
from cm3_pyg.errors import CheckpointError, ConfigError, DataFormatError, DataWarning
from cm3_pyg.io import atomic_torch_save
from cm3_pyg.models import CM3
from cm3_pyg.training import Trainer, build_graph_inputs, get_splits, load_config
from cm3_pyg.training.checkpoint import (
    CHECKPOINT_VERSION,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from cm3_pyg.training.inputs import Splits

HEADER = "userID\titemID\tx_label\n"


def _touch(path: str) -> None:
    """Called only if a pickle is executed: the tests assert it never is."""
    Path(path).touch()


class _Exploit:
    """Unpickling this runs ``_touch(marker)`` (what ``weights_only=True`` must refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_touch, (self.marker,))


def _folder(tmp_path: Path, body: str, rows: int = 4, name: str = "d") -> Path:
    """An MMRec folder with ``body`` as .inter rows and a [rows, 3] image feature file."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.inter").write_text(HEADER + body)
    np.save(folder / "image_feat.npy", np.ones((rows, 3), dtype=np.float32))
    return folder


# A clean body: users 0, 1 with train, valid and test rows over items 0..3.
CLEAN = "0\t0\t0\n0\t1\t1\n0\t2\t2\n1\t1\t0\n1\t3\t1\n1\t0\t2\n"


# ----------------------------------------------------------------------------- duplicates


def test_duplicates_warn_and_drop_keeping_the_earliest_split(tmp_path: Path) -> None:
    # line 8 repeats line 2 (train); line 9 is the train copy of line 3's valid pair.
    folder = _folder(tmp_path, CLEAN + "0\t0\t0\n0\t1\t0\n")
    with pytest.warns(DataWarning, match=r"d\.inter: 2 duplicate interaction rows dropped"):
        contents = read_mmrec_folder(folder)
    assert contents is not None
    inter = contents.interactions
    pairs = {(u, i): s for u, i, s in zip(inter.users, inter.items, inter.labels, strict=True)}
    assert len(inter) == 6 and pairs[(0, 1)] == 0  # the train copy wins over the valid one
    assert inter.lines.tolist() == [2, 4, 5, 6, 7, 9]
    with pytest.warns(DataWarning, match="duplicate"):
        data = MMRecDataset(folder)[0]
    assert data["user", "rates", "item"].valid_edge_index.tolist() == [[1], [3]]


def test_duplicates_error_policy_names_both_lines(tmp_path: Path) -> None:
    folder = _folder(tmp_path, CLEAN + "0\t0\t0\n")
    with pytest.raises(
        DataFormatError,
        match=r"d\.inter: line 8: duplicate interaction \(user 0, item 0, train\) of line 2",
    ):
        MMRecDataset(folder, duplicates="error")
    with pytest.raises(ConfigError, match="duplicate_interactions"):
        MMRecDataset(folder, duplicates="ignore")
    with pytest.raises(ConfigError, match="duplicate_interactions"):
        load_config(CM3.default_config(), overrides={"duplicate_interactions": "drop"})


def test_duplicate_policy_is_part_of_the_cache_fingerprint(tmp_path: Path) -> None:
    folder = _folder(tmp_path, CLEAN + "0\t0\t0\n")
    with pytest.warns(DataWarning):
        MMRecDataset(folder)  # cached under the "warn" policy
    with pytest.raises(DataFormatError, match="duplicate interaction"):
        MMRecDataset(folder, duplicates="error")  # must not reuse that cache


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("0\t0\t0\n0\t1\t2\n", r"the valid split is empty \(no row has x_label 1\)"),
        ("0\t0\t0\n0\t1\t1\n", r"the test split is empty \(no row has x_label 2\)"),
        (
            "0\t0\t0\n1\t1\t1\n0\t2\t2\n",
            r"the valid split is empty \(every such row belongs to a user without train rows",
        ),
    ],
)
@pytest.mark.filterwarnings("ignore::cm3_pyg.errors.DataWarning")  # the cold user of case 3
def test_empty_valid_or_test_split(tmp_path: Path, body: str, message: str) -> None:
    folder = _folder(tmp_path, body)
    with pytest.raises(DataFormatError, match=r"d\.inter: " + message):
        read_mmrec_folder(folder)


def test_users_only_in_valid_or_test_are_reported_and_dropped(tmp_path: Path) -> None:
    folder = _folder(tmp_path, CLEAN + "2\t1\t1\n2\t2\t2\n3\t0\t2\n")
    with pytest.warns(
        DataWarning,
        match=r"d\.inter: 2 users have valid/test rows but no train row \(first: user 2 at "
        r"line 8\); their 3 rows are dropped",
    ):
        data = MMRecDataset(folder)[0]
    assert data["user"].num_nodes == 4
    assert set(data["user", "rates", "item"].test_edge_index[0].tolist()) == {0, 1}


def test_trainer_refuses_empty_splits(tiny_synthetic) -> None:
    config = load_config(CM3.default_config(), overrides={"embedding_size": 8})
    inputs = build_graph_inputs(tiny_synthetic, config)
    splits = get_splits(tiny_synthetic)
    model = CM3.from_config(config, inputs)
    empty = torch.empty(2, 0, dtype=torch.long)
    with pytest.raises(DataFormatError, match="the valid split is empty"):
        Trainer(model, inputs, Splits(splits.train, empty, splits.test), config)
    with pytest.raises(DataFormatError, match="the test split is empty"):
        Trainer(model, inputs, Splits(splits.train, splits.valid, empty), config)


# ----------------------------------------------------------------------------- ids/features


def test_out_of_range_item_names_its_line(tmp_path: Path) -> None:
    folder = _folder(tmp_path, CLEAN + "1\t9\t0\n", rows=4)
    with pytest.raises(
        DataFormatError,
        match=r"image_feat\.npy: has 4 rows but the interactions reference 10 items .*"
        r"first: item 9 at d\.inter line 8",
    ):
        MMRecDataset(folder)


def test_header_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.inter"
    path.write_bytes(b"user\xffID\titemID\tx_label\n0\t0\t0\n")
    with pytest.raises(DataFormatError, match=r"d\.inter: line 1 \(header\) is not valid UTF-8"):
        read_interactions(path)


def test_feature_file_that_is_a_pickle_is_never_executed(tmp_path: Path) -> None:
    folder = _folder(tmp_path, CLEAN)
    marker = tmp_path / "executed"
    with open(folder / "image_feat.npy", "wb") as fh:
        np.save(fh, np.array([_Exploit(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError, match=r"image_feat\.npy: not a valid \.npy"):
        MMRecDataset(folder)
    assert not marker.exists()


def test_processed_cache_is_loaded_without_unpickling(tmp_path: Path) -> None:
    folder = _folder(tmp_path, CLEAN)
    ds = MMRecDataset(folder)
    marker = tmp_path / "executed"
    torch.save((_Exploit(marker), {}, None), ds.processed_paths[0])
    with pytest.warns(UserWarning, match="processed cache is unreadable.*rebuilding"):
        again = MMRecDataset(folder)
    assert not marker.exists()
    assert again[0]["item"].num_nodes == 4


# ----------------------------------------------------------------------------- validate


def _broken_folder(tmp_path: Path) -> Path:
    """Many problems at once, in both files."""
    body = (
        "0\t0\t0\n"
        "0\tx\t0\n"  # line 3: non-integer item
        "-4\t1\t0\n"  # line 4: negative user
        "0\t1\t7\n"  # line 5: bad label
        "0\t2\n"  # line 6: missing field
        "1\t3\t0\n"
        "1\t3\t0\n"  # line 8: duplicate of line 7
        "0\t12\t1\n"  # line 9: item beyond the feature rows
        "1\t2\t2\n"
    )
    folder = _folder(tmp_path, body, rows=6)
    bad = np.ones((6, 3))
    bad[2, 1] = np.nan
    bad[4, 0] = np.inf
    np.save(folder / "image_feat.npy", bad)
    np.save(folder / "text_feat.npy", np.ones((5, 2)))  # row count differs from image
    (folder / "audio_feat.npy").write_bytes(b"not numpy at all")
    return folder


def test_validate_collects_every_problem(tmp_path: Path) -> None:
    folder = _broken_folder(tmp_path)
    problems = validate_folder(folder, duplicates="error")
    errors = [p.message for p in problems if p.severity == "error"]
    expected = [
        r"d\.inter: line 6 has 2 fields; expected 3",
        r"d\.inter: line 4, column 'userID': expected a non-negative id, got '-4'",
        r"d\.inter: line 3, column 'itemID': expected an integer, got 'x'",
        r"d\.inter: line 5, column 'x_label': expected 0 \(train\), 1 \(valid\) or 2 \(test\)",
        r"d\.inter: line 8: duplicate interaction \(user 1, item 3, train\) of line 7",
        r"image_feat\.npy: row 2 \(item 2\) holds NaN/Inf",
        r"image_feat\.npy: row 4 \(item 4\) holds NaN/Inf",
        r"image_feat\.npy: has 6 rows but the interactions reference 13 items",
        r"audio_feat\.npy: not a valid \.npy file",
        r"text_feat\.npy: has 5 rows but .*image_feat\.npy has 6",
    ]
    for pattern in expected:
        assert any(re.search(pattern, e) for e in errors), (pattern, errors)
    assert len(errors) == len(expected) + 1  # text_feat also falls short of 13 items


def test_validate_messages_are_the_loaders_messages(tmp_path: Path) -> None:
    # Loading stops at the first error with exactly the message validate lists first.
    folder = _broken_folder(tmp_path)
    first = validate_folder(folder)[0].message
    with pytest.raises(DataFormatError) as info:
        MMRecDataset(folder)
    assert str(info.value) == first


def test_validate_command_output_and_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _broken_folder(tmp_path)
    assert validate_main([str(broken), "--modalities", "image", "--max-examples", "1"]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert all(line.startswith(("error: ", "warning: ")) for line in lines)
    assert "error(s)" in out.err and "error(s)" not in out.out
    # one example per kind, then a summary line for the rest
    assert any("1 more rows hold NaN/Inf" in line for line in lines)
    assert not any("text_feat" in line for line in lines)  # --modalities respected

    arrays = make_synthetic_arrays(num_users=30, num_items=20, modality_dims={"image": 4})
    clean = tmp_path / "clean"
    write_mmrec_folder(clean, "clean", arrays.users, arrays.items, arrays.labels, arrays.features)
    assert validate_main([str(clean)]) == 0
    assert capsys.readouterr().out == ""

    with open(clean / "clean.inter", "a") as fh:  # a cold user: a warning only
        fh.write("999\t1\t2\n")
    assert validate_main([str(clean)]) == 0
    assert capsys.readouterr().out.startswith("warning: ")
    assert validate_main([str(clean), "--strict"]) == 1
    capsys.readouterr()
    assert validate_main([str(tmp_path / "absent")]) == 1
    assert "dataset folder not found" in capsys.readouterr().out


def test_validate_module_runs_as_a_command(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "0\t0\t0\n")
    run = subprocess.run(
        [sys.executable, "-m", "cm3_pyg.data.validate", str(folder), "--name", "d"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"error: {folder / 'd.inter'}: the valid split is empty (no row has x_label 1); "
        "expected at least one row with x_label 1 whose user also has a train row",
        f"error: {folder / 'd.inter'}: the test split is empty (no row has x_label 2); "
        "expected at least one row with x_label 2 whose user also has a train row",
    ]
    assert "Traceback" not in run.stderr


def test_collecting_reader_keeps_the_good_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.inter"
    path.write_text(HEADER + "0\t0\t0\nx\t1\t0\n1\t1\t1\n")
    log = ProblemLog(collect=True)
    inter = scan_interactions(path, log)
    assert inter is not None and inter.users.tolist() == [0, 1] and inter.lines.tolist() == [2, 4]
    assert [p.severity for p in log.problems] == ["error"]
    check_interactions(inter, log)
    assert any("test split is empty" in p.message for p in log.errors)


def test_cli_reports_bad_data_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _folder(tmp_path, CLEAN + "0\t1.5\t0\n")
    code = cli.main(["--data-root", str(tmp_path), "--dataset", "d", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "d.inter: line 8, column 'itemID': expected an integer" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("n_ui_layer: 3\n", r"c\.yaml: unknown config key 'n_ui_layer'"),
        ("epochs: 2.5\n", r"c\.yaml: key 'epochs' expects an integer"),
        ("epochs: true\n", r"c\.yaml: key 'epochs' expects an integer"),
        ("gamma: [1]\n", r"c\.yaml: key 'gamma' expects a number"),
        ("topk: 20\n", r"c\.yaml: key 'topk' expects a list"),
        ("- epochs\n", r"c\.yaml: expected a mapping of keys to values, got list"),
        ("weight_decay: .nan\n", r"'weight_decay' must be a finite number"),
        ("max_sim: .inf\n", r"'max_sim' must be a finite number"),
        ("modalities: image\n", r"'modalities' must be null or a list of distinct names"),
        ("modalities: [image, image]\n", r"'modalities' must be null or a list"),
        ("sparse_backend: dense\n", r"'sparse_backend': unknown sparse backend 'dense'"),
        ("device: gpu0\n", r"config key 'device'"),
        ("epochs: 0\n", r"'epochs' must be a positive integer"),
        ("stopping_step: -1\n", r"'stopping_step' must be >= 0"),
    ],
)
def test_config_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(CM3.default_config(), path)


def test_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(CM3.default_config(), tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- checkpoints


def _valid_checkpoint(path: Path) -> dict:
    config = load_config(CM3.default_config())
    trainer_state = dict.fromkeys(
        (
            "epoch",
            "model",
            "optimizer",
            "inner_optimizers",
            "generator",
            "rng",
            "early_stopping",
            "best_valid",
            "best_test",
            "history",
            "stopped_early",
        ),
        0,
    )
    save_checkpoint(
        path, model="cm3", dataset="d", config=config, data_fingerprint="f", trainer=trainer_state
    )
    return config


def _rewrite(path: Path, **changes: object) -> None:
    obj = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del obj[key]
        else:
            obj[key] = value
    torch.save(obj, path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", r"checkpoint not found"),
        ("truncate", r"not a readable checkpoint"),
        ("garbage", r"not a readable checkpoint"),
        ("tensor", r"not a cm3_pyg checkpoint"),
        ("version", rf"checkpoint version 99 is not supported; expected {CHECKPOINT_VERSION}"),
        ("no_config", r"checkpoint lacks the key 'config'"),
        ("config_type", r"checkpoint key 'config' should be a dict, found list"),
        ("trainer_keys", r"checkpoint's trainer state lacks the key\(s\) \['history'\]"),
    ],
)
def test_malformed_checkpoints(tmp_path: Path, damage: str, message: str) -> None:
    path = tmp_path / "checkpoint.pt"
    _valid_checkpoint(path)
    if damage == "missing":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a zip" * 50)
    elif damage == "tensor":
        torch.save(torch.zeros(3), path)
    elif damage == "version":
        _rewrite(path, version=99)
    elif damage == "no_config":
        _rewrite(path, config=None)
    elif damage == "config_type":
        _rewrite(path, config=[1, 2])
    else:
        trainer = torch.load(path, weights_only=True)["trainer"]
        del trainer["history"]
        _rewrite(path, trainer=trainer)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: " + message):
        load_checkpoint(path)


def test_checkpoint_with_a_pickled_object_is_never_executed(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    marker = tmp_path / "executed"
    torch.save({"format": "cm3_pyg.checkpoint", "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_check_resumable_names_every_difference(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    config = _valid_checkpoint(path)
    saved = load_checkpoint(path)
    ok = {"model": "cm3", "dataset": "d", "config": config, "data_fingerprint": "f"}
    check_resumable(saved, path, **{**ok, "config": {**config, "epochs": 5}})  # epochs: fine
    changed = {**config, "n_ui_layers": 4, "learning_rate": 0.01}
    with pytest.raises(
        CheckpointError,
        match=r"differs from the checkpoint's in learning_rate: checkpoint 0\.001, requested "
        r"0\.01; n_ui_layers: checkpoint 3, requested 4 \(only epochs may change",
    ):
        check_resumable(saved, path, **{**ok, "config": changed})
    with pytest.raises(CheckpointError, match="trained model 'cm3'"):
        check_resumable(saved, path, **{**ok, "model": "lightgcn"})
    with pytest.raises(CheckpointError, match="trained on dataset 'd'"):
        check_resumable(saved, path, **{**ok, "dataset": "tiktok"})
    with pytest.raises(CheckpointError, match="the data differ"):
        check_resumable(saved, path, **{**ok, "data_fingerprint": "g"})


def test_atomic_torch_save_keeps_the_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def half_write(obj: object, fh: object) -> None:
        fh.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_full_disk_is_one_error_line_and_the_last_checkpoint_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil as shutil_module

    from cm3_pyg import io as cm3_io

    out = tmp_path / "run"
    argv = ["--model", "bprmf", "--epochs", "3", "--no-progress", "--out", str(out)]
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj: object, fh: object) -> None:
        calls["n"] += 1
        if calls["n"] > 2:  # after two good files, the disk is full: torch's own message
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64")
        real_save(obj, fh)

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(torch, "save", save_until_full)
    monkeypatch.setattr(cm3_io.shutil, "disk_usage", lambda _: usage._replace(free=1 << 20))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "No space left on device (1 MiB free" in err
    assert "Traceback" not in err
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(out / "checkpoint.pt")["trainer"]["epoch"] >= 1  # intact


def test_synthetic_data_passes_every_check(tmp_path: Path) -> None:
    arrays = make_synthetic_arrays(num_users=40, num_items=30, modality_dims={"image": 4})
    write_mmrec_folder(
        tmp_path / "s", "s", arrays.users, arrays.items, arrays.labels, arrays.features
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert validate_folder(tmp_path / "s") == []
        assert MMRecDataset(tmp_path / "s")[0]["item"].num_nodes == 30


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    from cm3_pyg.io import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    atomic_write_text(atomic, "x")
    assert atomic.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", "-5"], r"config key 'seed' must be an integer in \[0, 2\*\*32\)"),
        (["--config", "."], "is a folder; expected a YAML config file"),
        (["--out", "{file}"], "exists and is not a folder"),
        (["--out", "{file}/below"], "Not a directory"),
    ],
)
def test_cli_bad_paths_and_seeds_are_one_error_line(tmp_path, capsys, extra, message):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    extra = [e.replace("{file}", str(a_file)) for e in extra]
    argv = ["--epochs", "1", "--no-progress", "--out", str(tmp_path / "run"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err) and "Traceback" not in err


def test_cli_config_not_utf8(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"gamma: \xff\xfe\n")
    assert cli.main(["--epochs", "1", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_cli_summary_follows_the_configured_cut_offs(tmp_path, capsys):
    argv = ["--model", "bprmf", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r")]
    argv += ["--set", "topk=[5,10]", "--set", "valid_metric=recall@10"]
    assert cli.main(argv) == 0


def test_ctrl_c_exits_130_and_keeps_the_last_checkpoint(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "cm3_pyg.cli", "--model", "lightgcn", "--epochs", "500"]
    args += ["--set", "stopping_step=1000", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    text = err.decode()
    assert "error: interrupted" in text and "Traceback" not in text
    saved = load_checkpoint(out / "checkpoint.pt")  # intact, resumable
    assert saved["trainer"]["epoch"] >= 1


def test_a_damaged_or_edited_checkpoint_fails_its_checksum(tmp_path):
    out = tmp_path / "run"
    assert (
        cli.main(["--model", "lightgcn", "--epochs", "1", "--no-progress", "--out", str(out)]) == 0
    )
    path = out / "checkpoint.pt"
    raw = path.read_bytes()
    original = load_checkpoint(path)
    refused = 0
    damaged = tmp_path / "damaged.pt"
    for position in range(0, len(raw) - 300, len(raw) // 20):
        damaged.write_bytes(
            raw[:position]
            + bytes(b ^ 0x5A for b in raw[position : position + 300])
            + raw[position + 300 :]
        )
        try:
            loaded = load_checkpoint(damaged)
        except CheckpointError:
            refused += 1
            continue
        # only bytes the loader never reads were hit: the content is unchanged
        for key in ("model", "optimizer"):
            assert repr(loaded["trainer"][key]) == repr(original["trainer"][key])
    assert refused >= 10
    payload = torch.load(path, weights_only=True)
    state = payload["trainer"]["optimizer"]["state"]
    first = next(iter(state.values()))
    first["exp_avg"].mul_(1.001)  # a valid file whose optimiser moments changed
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "edited.pt")


def test_an_output_folder_belongs_to_one_run_at_a_time(tmp_path, capsys):
    import os
    import signal
    import time

    from cm3_pyg.errors import FolderBusyError
    from cm3_pyg.io import FolderLock

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from cm3_pyg.io import FolderLock; FolderLock({str(out)!r}).acquire(); "
            "print('held', flush=True); import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=rf"in use by pid {holder.pid} on "):
            FolderLock(out).acquire()
        argv = ["--model", "bprmf", "--epochs", "1", "--no-progress", "--out", str(out)]
        assert cli.main(argv) == 2
        assert f"in use by pid {holder.pid}" in capsys.readouterr().err
        assert not (out / "metrics.json").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up: the kernel drops the lock
        holder.wait(timeout=30)
    time.sleep(0.1)
    assert cli.main(argv) == 0  # a dead holder's lock is not stale
    with FolderLock(out):  # and the finished run released it
        pass
