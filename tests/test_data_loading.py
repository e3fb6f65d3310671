"""Tests of MMRec reading/validation, the HeteroData layout and MMRecDataset's cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import HeteroData

from cm3_pyg.data import dataset as dataset_module
from cm3_pyg.data.dataset import MMRecDataset, default_cache_dir
from cm3_pyg.data.hetero import RATED_BY, RATES, build_hetero_data, split_edge_index
from cm3_pyg.data.mmrec import (
    Interactions,
    discover_modalities,
    load_features,
    read_interactions,
)
from cm3_pyg.data.synthetic import make_synthetic_arrays, write_mmrec_folder
from cm3_pyg.errors import ConfigError, DataFormatError

DATA_ROOT = Path(
    os.environ.get(
        "CM3_DATA_ROOT", str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    )
)


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def _inter(tmp_path: Path, body: str, header: str = "userID\titemID\tx_label") -> Path:
    return _write(tmp_path / "d.inter", header + "\n" + body)


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    """A 60-user, 40-item MMRec folder with 'image' and 'text' features."""
    arrays = make_synthetic_arrays(
        num_users=60, num_items=40, modality_dims={"image": 6, "text": 4}, seed=3
    )
    folder = tmp_path / "small"
    write_mmrec_folder(folder, "small", arrays.users, arrays.items, arrays.labels, arrays.features)
    return folder


def _no_local_writes(folder: Path) -> Callable[[str | os.PathLike[str], int], bool]:
    """An os.access replacement that reports ``folder`` and its ``processed`` as read-only."""
    real = os.access
    blocked = {folder.resolve(), (folder / "processed").resolve()}

    def fake(path: str | os.PathLike[str], mode: int, *args: object, **kwargs: object) -> bool:
        if Path(path).resolve() in blocked and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    return fake


# ----------------------------------------------------------------------------- .inter


def test_read_interactions_basic(tmp_path: Path) -> None:
    path = _inter(tmp_path, "0\t1\t0\n1\t0\t1\n1\t2\t2\n")
    out = read_interactions(path)
    assert isinstance(out, Interactions)
    assert out.users.tolist() == [0, 1, 1]
    assert out.items.tolist() == [1, 0, 2]
    assert out.labels.tolist() == [0, 1, 2]
    assert out.users.dtype == np.int64 and len(out) == 3 and out.path == path


def test_read_interactions_tolerant_layout(tmp_path: Path) -> None:
    # Column order varies, extra columns hold anything, CRLF, blank lines, BOM, no final LF.
    text = "\ufeffrating\tx_label\titemID\tuserID\n4.5\t0\t7\t3\r\n\nabc\t2\t1\t0"
    out = read_interactions(_write(tmp_path / "d.inter", text))
    assert out.users.tolist() == [3, 0]
    assert out.items.tolist() == [7, 1]
    assert out.labels.tolist() == [0, 2]


def test_read_interactions_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"nope\.inter: interaction file not found"):
        read_interactions(tmp_path / "nope.inter")


def test_read_interactions_missing_column(tmp_path: Path) -> None:
    path = _inter(tmp_path, "0\t1\t0\n", header="userID\titemID\tlabel")
    with pytest.raises(DataFormatError, match=r"d\.inter: line 1 .*'x_label'.*'label'\]"):
        read_interactions(path)


def test_read_interactions_duplicate_column(tmp_path: Path) -> None:
    path = _inter(tmp_path, "0\t1\t0\t0\n", header="userID\titemID\tx_label\tuserID")
    with pytest.raises(DataFormatError, match=r"line 1 .*'userID' 2 times"):
        read_interactions(path)


def test_read_interactions_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"d\.inter: line 1 is empty"):
        read_interactions(_write(tmp_path / "d.inter", ""))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("0\t1\t0\n0\tabc\t0\n", r"line 3, column 'itemID': expected an integer, got 'abc'"),
        ("0\t1\t0\n1.5\t1\t0\n", r"line 3, column 'userID': expected an integer, got '1.5'"),
        ("-1\t1\t0\n", r"line 2, column 'userID': expected a non-negative id, got '-1'"),
        ("0\t1\t0\n0\t2\t3\n", r"line 3, column 'x_label': expected 0 \(train\).*got 3"),
        ("0\t1\t0\n0\t2\t-1\n", r"line 3, column 'x_label': expected a label in"),
        ("0\t1\t0\n0\t2\n", r"line 3 has 2 fields; expected 3"),
        ("0\t1\t0\n\n0\t2\t0\t9\n", r"line 4 has 4 fields; expected 3"),
        ("0\t1\t0\n0\t12345678901234567890\t0\n", r"line 3, column 'itemID'.*below 1e18"),
    ],
)
def test_read_interactions_bad_rows(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(DataFormatError, match=r"d\.inter: " + message):
        read_interactions(_inter(tmp_path, body))


@pytest.mark.parametrize("body", ["0\t1\t1\n1\t1\t2\n", ""])
def test_read_interactions_empty_train(tmp_path: Path, body: str) -> None:
    with pytest.raises(DataFormatError, match=r"d\.inter: the train split is empty"):
        read_interactions(_inter(tmp_path, body))


# ----------------------------------------------------------------------------- features


def test_discover_modalities_image_first(tmp_path: Path) -> None:
    for name in ["text_feat.npy", "audio_feat.npy", "image_feat.npy", "_feat.npy", "x.npy"]:
        np.save(tmp_path / name, np.zeros((2, 2), dtype=np.float32))
    assert discover_modalities(tmp_path) == ["image", "audio", "text"]
    (tmp_path / "empty").mkdir()
    assert discover_modalities(tmp_path / "empty") == []
    with pytest.raises(DataFormatError, match="dataset folder not found"):
        discover_modalities(tmp_path / "none")


def test_load_features_ok(tmp_path: Path) -> None:
    np.save(tmp_path / "image_feat.npy", np.arange(6, dtype=np.int32).reshape(3, 2))
    np.save(tmp_path / "text_feat.npy", np.ones((3, 4), dtype=np.float64))
    out = load_features(tmp_path, ["text", "image"], num_items=3)
    assert list(out) == ["text", "image"]
    assert out["image"].dtype == np.float32 and out["image"].shape == (3, 2)
    assert out["image"][2].tolist() == [4.0, 5.0]


def _save_raw(path: Path, payload: bytes) -> None:
    path.write_bytes(payload)


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        (lambda p: None, r"image_feat\.npy: feature file not found"),
        (
            lambda p: _save_raw(p, b"hello, not numpy"),
            r"image_feat\.npy: not a valid \.npy file \(it does not start with the NumPy magic",
        ),
        (
            lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True),
            r"image_feat\.npy: not a valid \.npy",
        ),
        (lambda p: np.save(p, np.zeros(4, np.float32)), r"expected a 2-D matrix.*\(4,\)"),
        (lambda p: np.save(p, np.zeros((2, 2, 2))), r"expected a 2-D matrix.*\(2, 2, 2\)"),
        (lambda p: np.save(p, np.zeros((4, 2), bool)), r"expected real numbers.*bool"),
        (lambda p: np.save(p, np.full((4, 2), "a")), r"expected real numbers.*<U1"),
        (lambda p: np.save(p, np.zeros((4, 0))), r"at least one feature column"),
    ],
)
def test_load_features_bad_file(
    tmp_path: Path, writer: Callable[[Path], None], message: str
) -> None:
    writer(tmp_path / "image_feat.npy")
    with pytest.raises(DataFormatError, match=message):
        load_features(tmp_path, ["image"])


def test_load_features_truncated(tmp_path: Path) -> None:
    path = tmp_path / "image_feat.npy"
    np.save(path, np.ones((50, 8), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataFormatError, match=r"image_feat\.npy: not a valid \.npy"):
        load_features(tmp_path, ["image"])


def test_load_features_npz_disguised(tmp_path: Path) -> None:
    with open(tmp_path / "image_feat.npy", "wb") as fh:
        np.savez(fh, a=np.ones((2, 2)))
    with pytest.raises(DataFormatError, match=r"image_feat\.npy: expected a single \.npy"):
        load_features(tmp_path, ["image"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e300])
def test_load_features_non_finite(tmp_path: Path, bad: float) -> None:
    x = np.zeros((5, 3))
    x[3, 1] = bad
    np.save(tmp_path / "image_feat.npy", x)
    with pytest.raises(DataFormatError, match=r"image_feat\.npy: row 3 \(item 3\) holds NaN/Inf"):
        load_features(tmp_path, ["image"])


def test_load_features_row_mismatch(tmp_path: Path) -> None:
    np.save(tmp_path / "image_feat.npy", np.zeros((5, 3)))
    np.save(tmp_path / "text_feat.npy", np.zeros((4, 3)))
    with pytest.raises(DataFormatError, match=r"text_feat\.npy: has 4 rows but .*image_feat"):
        load_features(tmp_path, ["image", "text"])
    with pytest.raises(DataFormatError, match=r"image_feat\.npy: has 5 rows .* 6 items"):
        load_features(tmp_path, ["image"], num_items=6)
    with pytest.raises(DataFormatError, match="distinct"):
        load_features(tmp_path, ["image", "image"])


# ----------------------------------------------------------------------------- HeteroData


def test_build_hetero_data_drop_rule() -> None:
    # Hand-worked: user 1 has no train row, so its valid/test rows go; duplicates collapse.
    users = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2]
    items = [1, 0, 1, 2, 3, 3, 0, 1, 2, 2, 0]
    labels = [0, 0, 0, 1, 2, 2, 1, 2, 0, 1, 2]
    feats = {"text": np.ones((5, 2)), "image": torch.zeros(5, 3, dtype=torch.float64)}
    data = build_hetero_data(np.array(users), torch.tensor(items), labels, feats)
    assert isinstance(data, HeteroData)
    assert data["user"].num_nodes == 3 and data["item"].num_nodes == 5
    assert data.modalities == ["text", "image"]
    assert data["item"].x_text.dtype == torch.float32 and data["item"].x_image.shape == (5, 3)
    assert data[RATES].edge_index.tolist() == [[0, 0, 2], [0, 1, 2]]
    assert data[RATES].valid_edge_index.tolist() == [[0, 2], [2, 2]]
    assert data[RATES].test_edge_index.tolist() == [[0, 2], [3, 0]]
    assert data[RATED_BY].edge_index.tolist() == [[0, 1, 2], [0, 0, 2]]
    for key in ("edge_index", "valid_edge_index", "test_edge_index"):
        assert data[RATES][key].dtype == torch.int64
    assert split_edge_index(data, "test").tolist() == [[0, 2], [3, 0]]


def test_build_hetero_data_counts_and_errors() -> None:
    data = build_hetero_data([0, 1], [0, 3], [0, 0], num_users=4, num_items=6)
    assert data["user"].num_nodes == 4 and data["item"].num_nodes == 6
    assert data.modalities == []
    with pytest.raises(DataFormatError, match=r"users: id 1 at position 1 .* num_users=1"):
        build_hetero_data([0, 1], [0, 3], [0, 0], num_users=1)
    with pytest.raises(DataFormatError, match=r"items: id 3 .* num_items=3"):
        build_hetero_data([0, 1], [0, 3], [0, 0], num_items=3)
    with pytest.raises(DataFormatError, match=r"features: expected 6 rows"):
        build_hetero_data([0], [0], [0], {"image": np.ones((4, 2))}, num_items=6)
    with pytest.raises(DataFormatError, match=r"expected the same number of rows"):
        build_hetero_data([0], [0], [0], {"a": np.ones((4, 2)), "b": np.ones((3, 2))})
    with pytest.raises(DataFormatError, match=r"features\['a'\]: row 1 holds NaN"):
        build_hetero_data([0], [0], [0], {"a": np.array([[0.0], [np.nan]])})
    with pytest.raises(DataFormatError, match=r"labels: expected 0 \(train\)"):
        build_hetero_data([0], [0], [4])
    with pytest.raises(DataFormatError, match=r"users: expected non-negative"):
        build_hetero_data([-2], [0], [0])
    with pytest.raises(DataFormatError, match=r"expected equal lengths"):
        build_hetero_data([0, 1], [0], [0])
    with pytest.raises(ValueError, match=r"split: expected one of"):
        split_edge_index(data, "training")
    with pytest.raises(DataFormatError, match="no 'edge_index'"):
        split_edge_index(HeteroData(), "train")


# ----------------------------------------------------------------------------- dataset


def test_dataset_round_trip(small_folder: Path) -> None:
    ds = MMRecDataset(str(small_folder))
    assert len(ds) == 1 and ds.name == "small"
    data = ds[0]
    inter = read_interactions(small_folder / "small.inter")
    feats = load_features(small_folder, ["image", "text"])
    ref = build_hetero_data(inter.users, inter.items, inter.labels, feats)
    assert data.modalities == ["image", "text"]
    assert data["user"].num_nodes == ref["user"].num_nodes == 60
    assert data["item"].num_nodes == ref["item"].num_nodes == 40
    for m in ("image", "text"):
        assert torch.equal(data["item"][f"x_{m}"], ref["item"][f"x_{m}"])
    for key in ("edge_index", "valid_edge_index", "test_edge_index"):
        assert torch.equal(data[RATES][key], ref[RATES][key])
    assert torch.equal(data[RATED_BY].edge_index, ref[RATED_BY].edge_index)
    # The cache lives beside the data, under a fingerprinted name.
    (path,) = ds.processed_paths
    assert Path(path).parent == small_folder / "processed"
    assert Path(path).name == f"small_{ds.fingerprint[:16]}.pt"
    assert "users=60" in repr(ds)


def _mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files whose mappings (``/proc/self/maps``) hold ``tensor``'s first byte."""
    address = tensor.data_ptr()
    files = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(v, 16) for v in fields[0].split("-"))
        if low <= address < high and len(fields) == 6:
            files.add(fields[5].strip())
    return files


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_dataset_maps_its_cache_by_default_and_reads_it_when_asked(small_folder: Path) -> None:
    mapped = MMRecDataset(str(small_folder))
    (cache,) = mapped.processed_paths
    features = mapped[0]["item"]["x_image"]
    assert _mapped_files(features) == {str(Path(cache).resolve())}
    read = MMRecDataset(str(small_folder), mmap=False)
    copy = read[0]["item"]["x_image"]
    assert _mapped_files(copy) == set() or str(Path(cache).resolve()) not in _mapped_files(copy)
    assert torch.equal(features, copy)
    # copy-on-write: a write to the loaded table changes neither the file nor a new load
    before = copy[0, 0].item()
    features[0, 0] = before + 1.0
    assert MMRecDataset(str(small_folder), mmap=False)[0]["item"]["x_image"][0, 0] == before
    with pytest.raises(ConfigError, match="mmap: expected True or False"):
        MMRecDataset(str(small_folder), mmap="yes")  # type: ignore[arg-type]


def test_dataset_uses_cache(small_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = MMRecDataset(str(small_folder))[0]

    def boom(self: MMRecDataset) -> None:
        raise AssertionError("process() must not run when a valid cache exists")

    monkeypatch.setattr(MMRecDataset, "process", boom)
    again = MMRecDataset(str(small_folder), transform=lambda d: d)[0]
    assert torch.equal(first[RATES].edge_index, again[RATES].edge_index)
    assert again.modalities == ["image", "text"]


def test_an_edit_keeping_size_and_mtime_still_rebuilds_the_cache(small_folder: Path) -> None:
    base = MMRecDataset(str(small_folder))[0]
    feat = small_folder / "text_feat.npy"
    stat = os.stat(feat)
    original = np.load(feat)
    np.save(feat, np.full_like(original, 3.0))  # same shape and dtype: the same size
    os.utime(feat, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p / rsync -a leave it
    assert os.stat(feat).st_size == stat.st_size and os.stat(feat).st_mtime_ns == stat.st_mtime_ns
    again = MMRecDataset(str(small_folder))[0]
    assert torch.all(again["item"].x_text == 3.0)
    assert not torch.equal(base["item"].x_text, again["item"].x_text)


def test_dataset_cache_invalidation(small_folder: Path) -> None:
    base = MMRecDataset(str(small_folder))
    old_path = base.processed_paths[0]

    # A feature file changes (new content and a different mtime).
    feat = small_folder / "text_feat.npy"
    np.save(feat, np.full((40, 4), 7.0, dtype=np.float32))
    stat = os.stat(feat)
    os.utime(feat, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = MMRecDataset(str(small_folder))
    assert changed.processed_paths[0] != old_path
    assert torch.all(changed[0]["item"].x_text == 7.0)

    # The modality list changes.
    only_image = MMRecDataset(str(small_folder), modalities=["image"])
    assert only_image.processed_paths[0] not in {old_path, changed.processed_paths[0]}
    assert only_image[0].modalities == ["image"] and "x_text" not in only_image[0]["item"]

    # The pre_transform changes.
    def tag(data: HeteroData) -> HeteroData:
        data.tagged = True
        return data

    tagged = MMRecDataset(str(small_folder), pre_transform=tag)
    assert tagged.processed_paths[0] != changed.processed_paths[0]
    assert tagged[0].tagged is True


def test_dataset_force_reload(small_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    MMRecDataset(str(small_folder))
    calls = []
    original = MMRecDataset.process

    def counting(self: MMRecDataset) -> None:
        calls.append(1)
        original(self)

    monkeypatch.setattr(MMRecDataset, "process", counting)
    MMRecDataset(str(small_folder), force_reload=True)
    assert calls == [1]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_object"])
def test_dataset_corrupt_cache_rebuilt(small_folder: Path, damage: str) -> None:
    ds = MMRecDataset(str(small_folder))
    expected = ds[0][RATES].edge_index.clone()
    path = Path(ds.processed_paths[0])
    # the damage is done in place, to the file ds maps: reading ds's tensors after a
    # truncation would fault (see MMRecDataset's docstring), so ds goes first
    del ds
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    else:
        torch.save(torch.zeros(3), path)
    with pytest.warns(UserWarning, match="processed cache is unreadable.*rebuilding"):
        rebuilt = MMRecDataset(str(small_folder))
    assert torch.equal(rebuilt[0][RATES].edge_index, expected)
    assert rebuilt[0].modalities == ["image", "text"]


def test_dataset_cache_with_edited_content_is_rebuilt(small_folder: Path) -> None:
    """A cache that still loads but whose numbers changed after the write (a disk fault, a
    hand edit) fails its checksum and is rebuilt from the inputs."""
    ds = MMRecDataset(str(small_folder))
    path = Path(ds.processed_paths[0])
    stored, slices, cls, checksum = torch.load(path, weights_only=True)
    expected = ds[0][RATES].edge_index.clone()
    edited = False
    for value in stored.values():  # flip one edge of the stored interactions
        if isinstance(value, dict) and "edge_index" in value:
            value["edge_index"][1, 0] = (value["edge_index"][1, 0] + 1) % 2
            edited = True
    assert edited
    torch.save((stored, slices, cls, checksum), path)
    with pytest.warns(UserWarning, match="fails its content checksum.*rebuilding"):
        rebuilt = MMRecDataset(str(small_folder))
    assert torch.equal(rebuilt[0][RATES].edge_index, expected)


def test_dataset_atomic_save(small_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(obj: object, fh: object) -> None:
        fh.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(dataset_module.torch, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        MMRecDataset(str(small_folder))
    leftovers = list((small_folder / "processed").iterdir())
    assert leftovers == []
    monkeypatch.undo()
    assert MMRecDataset(str(small_folder))[0].modalities == ["image", "text"]


def test_dataset_unwritable_root_uses_cache_dir(
    small_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "access", _no_local_writes(small_folder))
    cache = tmp_path / "cache"
    ds = MMRecDataset(str(small_folder), cache_dir=str(cache))
    assert Path(ds.processed_paths[0]).parent == cache
    assert Path(ds.processed_paths[0]).is_file()
    assert not (small_folder / "processed").exists()
    assert ds[0]["item"].num_nodes == 40

    # Without cache_dir: $CM3_CACHE_DIR/<name>-<hash>.
    monkeypatch.setenv("CM3_CACHE_DIR", str(tmp_path / "env_cache"))
    ds2 = MMRecDataset(str(small_folder))
    assert Path(ds2.processed_dir) == default_cache_dir(small_folder, "small")
    assert Path(ds2.processed_dir).parent == tmp_path / "env_cache"
    assert Path(ds2.processed_dir).name.startswith("small-")


def test_dataset_read_only_mode_bits_use_cache_dir(small_folder: Path, tmp_path: Path) -> None:
    # Mode bits alone mark the folder read-only, which holds even for root.
    small_folder.chmod(0o555)
    try:
        ds = MMRecDataset(str(small_folder), cache_dir=str(tmp_path / "cache"))
        assert Path(ds.processed_dir) == tmp_path / "cache"
        assert not (small_folder / "processed").exists()
    finally:
        small_folder.chmod(0o755)


def test_dataset_never_caches_in_the_folder_when_asked(small_folder: Path, tmp_path: Path) -> None:
    # The folder is writable, but cache_in_folder=False keeps everything out of it.
    before = sorted(p.name for p in small_folder.iterdir())
    ds = MMRecDataset(str(small_folder), cache_dir=str(tmp_path / "cache"), cache_in_folder=False)
    assert Path(ds.processed_dir) == tmp_path / "cache"
    assert Path(ds.processed_paths[0]).is_file()
    assert sorted(p.name for p in small_folder.iterdir()) == before
    default = MMRecDataset(str(small_folder))
    assert Path(default.processed_dir) == small_folder / "processed"
    assert torch.equal(
        ds[0]["user", "rates", "item"].edge_index, default[0]["user", "rates", "item"].edge_index
    )


def test_dataset_missing_inputs(small_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="dataset folder not found"):
        MMRecDataset(str(tmp_path / "absent"))
    with pytest.raises(DataFormatError, match=r"missing input file\(s\) .*audio_feat\.npy"):
        MMRecDataset(str(small_folder), modalities=["image", "audio"])
    with pytest.raises(DataFormatError, match=r"missing input file\(s\) .*other\.inter"):
        MMRecDataset(str(small_folder), name="other")
    with pytest.raises(DataFormatError, match="distinct"):
        MMRecDataset(str(small_folder), modalities=["image", "image"])


def test_dataset_bad_inputs(small_folder: Path) -> None:
    inter = small_folder / "small.inter"
    with open(inter, "a") as fh:
        fh.write("0\t40\t0\n")  # item 40 but the features have 40 rows (ids 0..39)
    with pytest.raises(DataFormatError, match=r"image_feat\.npy: has 40 rows .* 41 items"):
        MMRecDataset(str(small_folder))
    lines = inter.read_text().splitlines()
    with open(inter, "a") as fh:
        fh.write("0\tx\t0\n")
    with pytest.raises(DataFormatError, match=rf"small\.inter: line {len(lines) + 1}, "):
        MMRecDataset(str(small_folder))


# ----------------------------------------------------------------------------- real data


def test_tiktok_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = DATA_ROOT / "tiktok"
    if not (folder / "tiktok.inter").is_file():
        pytest.skip(f"TikTok data not found under {DATA_ROOT} (set CM3_DATA_ROOT)")
    # Expected numbers from the raw file with plain Python, independent of the loader.
    with open(folder / "tiktok.inter") as fh:
        header = fh.readline().split()
        rows = [dict(zip(header, line.split(), strict=True)) for line in fh if line.strip()]
    triples = [(int(r["userID"]), int(r["itemID"]), int(r["x_label"])) for r in rows]
    train = {(u, i) for u, i, s in triples if s == 0}
    train_users = {u for u, _ in train}
    valid = {(u, i) for u, i, s in triples if s == 1 and u in train_users}
    test = {(u, i) for u, i, s in triples if s == 2 and u in train_users}
    assert sum(s == 0 for *_, s in triples) == 59_541

    # Keep the shared third-party folder untouched: force the cache into tmp_path.
    monkeypatch.setattr(os, "access", _no_local_writes(folder))
    ds = MMRecDataset(str(folder), cache_dir=str(tmp_path / "cache"))
    data = ds[0]
    assert data["user"].num_nodes == 9_308 == max(u for u, _, _ in triples) + 1
    assert data["item"].num_nodes == 6_710
    assert data.modalities == ["image", "audio"]
    assert data["item"].x_image.shape == (6_710, 128)
    assert data["item"].x_audio.shape == (6_710, 128)
    assert data[RATES].edge_index.shape == (2, len(train))
    assert data[RATES].valid_edge_index.shape == (2, len(valid))
    assert data[RATES].test_edge_index.shape == (2, len(test))
    got = set(map(tuple, data[RATES].edge_index.t().tolist()))
    assert got == train


def test_load_data_reads_another_split_file_of_the_folder(small_folder):
    from cm3_pyg.data.loading import load_dataset
    from cm3_pyg.errors import CM3Error

    # A second split of the same graph: per user, the first row is test, the second
    # valid, the rest train.
    lines = (small_folder / "small.inter").read_text().splitlines()
    header, rows = lines[0], [line.split("\t") for line in lines[1:]]
    position: dict[str, int] = {}
    relabelled = []
    for user, item, _ in rows:
        k = position[user] = position.get(user, -1) + 1
        relabelled.append("\t".join([user, item, "2" if k == 0 else "1" if k == 1 else "0"]))
    seen = set(position)
    (small_folder / "other_split.inter").write_text("\n".join([header, *relabelled]) + "\n")
    data, name = load_dataset(str(small_folder.parent), "small", inter="other_split")
    assert name == "other_split"
    store = data["user", "rates", "item"]
    assert store.test_edge_index.size(1) == len(seen)
    default, default_name = load_dataset(str(small_folder.parent), "small")
    assert default_name == "small"
    assert default["user", "rates", "item"].test_edge_index.size(1) != len(seen)
    with pytest.raises(CM3Error, match="expected a file stem"):
        load_dataset(str(small_folder.parent), "small", inter="other_split.inter")
    with pytest.raises(CM3Error, match="needs --dataset"):
        load_dataset(None, None, inter="other_split")


def test_processed_versions_are_bounded_and_killed_writes_cleaned(small_folder: Path) -> None:
    import time as clock

    from cm3_pyg.data import dataset as ds

    base = MMRecDataset(str(small_folder))
    folder = Path(base.processed_dir)
    name = base.name
    # earlier versions, a sibling split's cache and temporaries (one stale, one fresh)
    for i in range(ds.CACHES_KEPT + 3):
        old = folder / f"{name}_{i:016x}.pt"
        old.write_bytes(b"x")
        os.utime(old, (clock.time() - 1000 - i, clock.time() - 1000 - i))
    sibling = folder / f"{name}_diffmm_split_{0:016x}.pt"
    sibling.write_bytes(b"x")
    stale = folder / f".{name}_{1:016x}.pt.abc.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (clock.time() - 2 * ds.STALE_TEMPORARY_SECONDS,) * 2)
    fresh = folder / f".{name}_{2:016x}.pt.def.tmp"
    fresh.write_bytes(b"x")
    rebuilt = MMRecDataset(str(small_folder), force_reload=True)
    kept = sorted(p.name for p in folder.glob(f"{name}_*.pt") if p != sibling)
    assert len(kept) == ds.CACHES_KEPT and Path(rebuilt.processed_paths[0]).name in kept
    assert f"{name}_{0:016x}.pt" in kept  # the most recently used old versions stay
    assert sibling.exists() and fresh.exists() and not stale.exists()
