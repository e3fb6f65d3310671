"""Shared fixtures: the real-data root (skipped when absent) and a tiny synthetic set."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    """``$CM3_DATA_ROOT`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("CM3_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture
def data_root() -> Path:
    return real_data_root()


@pytest.fixture
def tiktok_dir() -> Path:
    folder = real_data_root() / "tiktok"
    if not (folder / "tiktok.inter").exists():
        pytest.skip(f"real TikTok data not found at {folder} (set CM3_DATA_ROOT)")
    return folder


@pytest.fixture(scope="session")
def tiny_synthetic():
    from cm3_pyg.data import make_synthetic

    return make_synthetic(
        num_users=300, num_items=200, modality_dims={"image": 16, "text": 12, "audio": 8}, seed=3
    )


@pytest.fixture(autouse=True)
def _quiet_sparse_beta_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield
