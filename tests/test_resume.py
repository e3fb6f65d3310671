"""Crash-safe training: per-epoch checkpoints, exact resume (also after SIGKILL), NaN stops,
and bit-identical metrics for the same seed on CPU."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cm3_pyg import cli
from cm3_pyg.data import MMRecDataset, make_synthetic, make_synthetic_arrays, write_mmrec_folder
from cm3_pyg.errors import NonFiniteLossError
from cm3_pyg.models import CM3
from cm3_pyg.training import CHECKPOINT_NAME, load_checkpoint, load_config, run_experiment

SIZES = {"num_users": 150, "num_items": 100, "modality_dims": {"image": 8, "text": 6}, "seed": 1}
SMALL = {"train_batch_size": 256, "embedding_size": 16, "stopping_step": 100, "seed": 3}
EPOCHS = 5
# Only timings may differ between two runs of the same configuration.
TIMING_KEYS = {"epoch_seconds", "resumed_from_epoch"}


def _config(**overrides: Any) -> dict[str, Any]:
    return load_config(CM3.default_config(), overrides={"epochs": EPOCHS, **SMALL, **overrides})


def _metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())


def _csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "epochs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:  # timings differ from run to run
        del row["train_seconds"], row["eval_seconds"]
    return rows


@pytest.fixture(scope="module")
def data():
    return make_synthetic(**SIZES)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted in-process run of EPOCHS epochs."""
    out = tmp_path_factory.mktemp("reference")
    run_experiment(data, "cm3", _config(), out_dir=out, progress=False)
    return out


def test_same_seed_gives_bit_identical_metrics_json(data, reference: Path, tmp_path: Path) -> None:
    run_experiment(data, "cm3", _config(), out_dir=tmp_path, progress=False)
    first, second = _metrics(reference), _metrics(tmp_path)
    assert first["stop_reason"] == "completed" and first["resumed_from_epoch"] is None
    # exact equality of every float (JSON keeps the shortest round-trip repr)
    assert {k: v for k, v in first.items() if k not in TIMING_KEYS} == {
        k: v for k, v in second.items() if k not in TIMING_KEYS
    }
    assert _csv_rows(reference) == _csv_rows(tmp_path)
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint["trainer"]["epoch"] == EPOCHS


def test_nan_loss_stops_keeps_checkpoint_and_reports_best_so_far(
    data, reference: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / CHECKPOINT_NAME
    seen: dict[str, bytes] = {}

    def inject_nan(epoch: int, batch: int, loss: torch.Tensor) -> torch.Tensor:
        if (epoch, batch) == (3, 2):
            seen["checkpoint"] = ckpt.read_bytes()  # the checkpoint of epoch 2
            return loss * float("nan")
        return loss

    with pytest.raises(
        NonFiniteLossError, match=r"^loss is nan at epoch 3, batch 2 of 10: training stopped$"
    ):
        run_experiment(
            data, "cm3", _config(), out_dir=tmp_path, progress=False, fault_injector=inject_nan
        )
    assert ckpt.read_bytes() == seen["checkpoint"]  # intact, not overwritten
    assert load_checkpoint(ckpt)["trainer"]["epoch"] == 2
    metrics = _metrics(tmp_path)
    assert metrics["stop_reason"] == "non_finite_loss" and metrics["epochs_run"] == 2
    assert metrics["non_finite_loss"] == {"epoch": 3, "batch": 2, "num_batches": 10, "value": "nan"}
    assert "loss is nan at epoch 3, batch 2" in metrics["error"]
    # best so far = what a clean run had after its first two epochs
    clean = _csv_rows(reference)[:2]
    assert _csv_rows(tmp_path) == clean
    best = max(clean, key=lambda r: float(r["valid_recall@20"]))
    assert metrics["best_epoch"] == int(best["epoch"])
    assert f"{metrics['valid']['recall@20']:.6f}" == best["valid_recall@20"]

    # Once the fault is gone the intact checkpoint resumes to the uninterrupted result.
    resumed = run_experiment(data, "cm3", _config(), out_dir=tmp_path, progress=False, resume=True)
    assert resumed["resumed_from_epoch"] == 2 and "error" not in resumed
    expected = _metrics(reference)
    assert resumed["valid"] == expected["valid"] and resumed["test"] == expected["test"]
    assert _csv_rows(tmp_path) == _csv_rows(reference)


def test_cli_nan_exit_code_and_resume_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arrays = make_synthetic_arrays(**SIZES)
    write_mmrec_folder(
        tmp_path / "tiny", "tiny", arrays.users, arrays.items, arrays.labels, arrays.features
    )
    base = ["--data-root", str(tmp_path), "--dataset", "tiny", "--no-progress"]
    base += [arg for k, v in SMALL.items() for arg in ("--set", f"{k}={v}")]
    out = tmp_path / "run"

    # An absurd learning rate overflows the parameters: the loss turns NaN/Inf.
    code = cli.main([*base, "--epochs", "3", "--out", str(out), "--set", "learning_rate=1e30"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_NON_FINITE_LOSS == 3
    assert "error: loss is" in err and "at epoch 1, batch" in err and "Traceback" not in err
    assert _metrics(out)["stop_reason"] == "non_finite_loss"

    # a fresh run does not replace the failed one's files unless told to
    assert cli.main([*base, "--epochs", "2", "--out", str(out)]) == 2
    assert "holds an earlier run (metrics.json, epochs.csv" in capsys.readouterr().err
    assert _metrics(out)["stop_reason"] == "non_finite_loss"  # untouched
    assert cli.main([*base, "--epochs", "2", "--out", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert _metrics(out)["stop_reason"] != "non_finite_loss" and "error" not in _metrics(out)
    # the configuration must match (except epochs) ...
    code = cli.main([*base, "--epochs", "3", "--resume", str(out), "--set", "n_ui_layers=2"])
    err = capsys.readouterr().err
    assert code == 2 and "n_ui_layers: checkpoint 3, requested 2" in err
    # ... the output folder is the resumed one ...
    assert cli.main([*base, "--resume", str(out), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "drop --out" in capsys.readouterr().err
    # ... and a folder without checkpoint is refused.
    assert cli.main([*base, "--resume", str(tmp_path / "tiny")]) == 2
    assert "checkpoint.pt: checkpoint not found" in capsys.readouterr().err
    # More epochs continue the run, with one CSV row per epoch.
    assert cli.main([*base, "--epochs", "3", "--resume", str(out)]) == 0
    assert [r["epoch"] for r in _csv_rows(out)] == ["1", "2", "3"]
    assert _metrics(out)["resumed_from_epoch"] == 2


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    arrays = make_synthetic_arrays(**SIZES)
    write_mmrec_folder(
        tmp_path / "tiny", "tiny", arrays.users, arrays.items, arrays.labels, arrays.features
    )
    # Smaller batches: more, shorter steps per epoch, so the kill lands inside an epoch.
    settings = {**SMALL, "train_batch_size": 64}
    epochs = 8
    args = [sys.executable, "-m", "cm3_pyg.cli", "--data-root", str(tmp_path)]
    args += ["--dataset", "tiny", "--epochs", str(epochs), "--no-progress"]
    args += [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
    full_out = tmp_path / "full"

    # Default threading on purpose: bit-identical resume must not depend on one thread.
    env = dict(os.environ)

    def start(*extra: str, log: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / log, "wb") as fh:
            return subprocess.Popen([*args, *extra], stdout=fh, stderr=subprocess.STDOUT, env=env)

    def wait_for_new_checkpoint(
        victim: subprocess.Popen[bytes], ckpt: Path, previous: int | None
    ) -> tuple[int, float]:
        """Poll until checkpoint.pt is (re)written; returns its inode and the time."""
        deadline = time.monotonic() + 180
        while True:
            # os.replace gives every new checkpoint a new inode; it exists only when complete
            inode = ckpt.stat().st_ino if ckpt.exists() else None
            if inode is not None and inode != previous:
                return inode, time.monotonic()
            assert victim.poll() is None, (tmp_path / "victim.log").read_text()
            assert time.monotonic() < deadline, "no new checkpoint within 180 s"
            time.sleep(0.005)

    MMRecDataset(tmp_path / "tiny")  # build the processed cache once, before both runs
    full = start("--out", str(full_out), log="full.log")
    # Epoch times swing on a shared machine (the full run competes for the same cores), so a
    # kill aimed at half an epoch can land after the last one. Then the attempt is repeated in
    # a fresh folder with a shorter delay; any moment after the second checkpoint is a valid
    # crash point, the middle of an epoch is just the likeliest to expose a bug.
    for attempt in range(4):
        killed_out = tmp_path / f"killed{attempt}"
        victim = start("--out", str(killed_out), log="victim.log")
        ckpt = killed_out / CHECKPOINT_NAME
        inode, first = wait_for_new_checkpoint(victim, ckpt, None)  # epoch 1 done
        _, second = wait_for_new_checkpoint(victim, ckpt, inode)  # epoch 2 done
        time.sleep((second - first) / 2 ** (attempt + 1))  # inside epoch 3, if epochs are even
        if victim.poll() is None:
            break
    assert victim.poll() is None, "every run ended before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_out / "metrics.json").exists()
    killed_after = load_checkpoint(ckpt)["trainer"]["epoch"]
    assert 2 <= killed_after < epochs

    resumed = subprocess.run(
        [*args, "--resume", str(killed_out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    assert full.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()
    expected, got = _metrics(full_out), _metrics(killed_out)
    assert got["resumed_from_epoch"] == killed_after
    for key in ("valid", "test", "best_epoch", "epochs_run", "stop_reason", "popularity"):
        assert got[key] == expected[key], key
    # every epoch exactly once, with the uninterrupted run's losses and metrics
    assert _csv_rows(killed_out) == _csv_rows(full_out)
    assert [r["epoch"] for r in _csv_rows(killed_out)] == [str(e) for e in range(1, epochs + 1)]
    assert not list(killed_out.glob(".*.tmp"))  # no temporary files left behind
