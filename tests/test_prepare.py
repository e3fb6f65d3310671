"""cm3-pyg prepare: raw interactions with string ids (+ item texts) -> an MMRec folder."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from cm3_pyg.cli.app import main as app_main
from cm3_pyg.data.idmaps import external_ids
from cm3_pyg.data.loading import load_dataset
from cm3_pyg.data.prepare import PrepareOptions, prepare_dataset
from cm3_pyg.errors import ConfigError, DataFormatError
from cm3_pyg.training.inputs import get_splits


def _fake_encoder(texts):
    """A deterministic stand-in for the sentence encoder: 8 numbers from each string's hash."""
    rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:8], dtype=np.uint8) for t in texts]
    return np.stack(rows).astype(np.float32) / 255.0


def _write_raw(folder: Path, users=40, items=25, per_user=9, seed=0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    lines = ["who,what,when,rating"]
    for u in range(users):
        chosen = rng.choice(items, size=per_user, replace=False)
        for j, i in enumerate(chosen):
            lines.append(f"user-{u:03d},sku_{i * 3},{1000 + u * 10 + j},{rng.integers(1, 6)}")
    lines.append("user-000,sku_0,5,3")  # a repeat (if present) or an extra row
    interactions = folder / "ratings.csv"
    interactions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    item_lines = ["sku,title,genre,year"]
    for i in reversed(range(items)):
        item_lines.append(f'sku_{i * 3},"Title {i}, part two",genre{i % 4},{1990 + i}')
    table = folder / "items.csv"
    table.write_text("\n".join(item_lines) + "\n", encoding="utf-8")
    return interactions, table


def _options(table: Path, **extra) -> PrepareOptions:
    defaults = dict(
        user_col="who",
        item_col="what",
        time_col="when",
        items=table,
        item_id_col="sku",
        text_cols=("title", "genre"),
        numeric_cols=("year",),
        numeric_name="meta",
    )
    return PrepareOptions(**{**defaults, **extra})


def test_prepare_writes_a_loadable_folder_with_id_maps_and_features(tmp_path):
    interactions, table = _write_raw(tmp_path)
    out = tmp_path / "root" / "shop"
    summary = prepare_dataset(interactions, out, _options(table), encoder=_fake_encoder)
    data, name = load_dataset(str(tmp_path / "root"), "shop")
    assert name == "shop" and sorted(data.modalities) == ["meta", "text"]
    users, items = external_ids(data, "user"), external_ids(data, "item")
    splits = get_splits(data)
    prepared = set()
    for edges in (splits.train, splits.valid, splits.test):
        prepared |= {(users.to_external(u), items.to_external(i)) for u, i in edges.t().tolist()}
    raw = {tuple(line.split(",")[:2]) for line in interactions.read_text().splitlines()[1:]}
    assert prepared == raw  # every distinct pair once, under its own ids
    assert summary["interactions"] == len(raw) and summary["users"] == 40
    # feature rows follow the internal item ids
    text = np.load(out / "text_feat.npy")
    meta = np.load(out / "meta_feat.npy")
    for internal in range(len(items)):
        sku = items.to_external(internal)
        i = int(sku.split("_")[1]) // 3
        np.testing.assert_array_equal(
            text[internal], _fake_encoder([f"Title {i}, part two. genre{i % 4}"])[0]
        )
        assert meta[internal, 0] == 1990 + i
    assert json.loads((out / "prepare.json").read_text())["split"] == "random"


def test_repeated_pairs_keep_the_earliest(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("u\ti\tt\na\tx\t5\na\tx\t1\nb\tx\t2\nb\ty\t3\na\ty\t4\n", encoding="utf-8")
    summary = prepare_dataset(path, tmp_path / "d" / "r", PrepareOptions("u", "i", time_col="t"))
    assert summary["interactions"] == 4 and summary["dropped_repeats"] == 1


def test_kcore_matches_a_brute_force_filter(tmp_path):
    rng = np.random.default_rng(4)
    rows = {
        (int(u), int(i))
        for u, i in zip(rng.integers(0, 60, 500), rng.zipf(1.6, 500) % 80, strict=True)
    }
    path = tmp_path / "r.csv"
    path.write_text("u,i\n" + "".join(f"U{u},I{i}\n" for u, i in sorted(rows)), encoding="utf-8")
    kept = set(rows)
    while True:  # the definition: drop users/items under 5 until nothing changes
        du, di = defaultdict(int), defaultdict(int)
        for u, i in kept:
            du[u] += 1
            di[i] += 1
        new = {(u, i) for u, i in kept if du[u] >= 5 and di[i] >= 5}
        if new == kept:
            break
        kept = new
    out = tmp_path / "d" / "r"
    summary = prepare_dataset(path, out, PrepareOptions("u", "i", kcore=5))
    data, _ = load_dataset(str(tmp_path / "d"), "r")
    users, items = external_ids(data, "user"), external_ids(data, "item")
    splits = get_splits(data)
    got = set()
    for edges in (splits.train, splits.valid, splits.test):
        got |= {
            (int(users.to_external(u)[1:]), int(items.to_external(i)[1:]))
            for u, i in edges.t().tolist()
        }
    assert got == kept and summary["dropped_by_kcore"] == len(rows) - len(kept)


def test_temporal_split_trains_on_the_past(tmp_path):
    interactions, table = _write_raw(tmp_path)
    out = tmp_path / "root" / "shop"
    prepare_dataset(
        interactions, out, _options(table, split="temporal", text_cols=(), numeric_cols=())
    )
    times = {}
    for line in interactions.read_text().splitlines()[1:]:
        who, what, when, _ = line.split(",")
        key = (who, what)
        times[key] = min(times.get(key, float(when)), float(when))  # repeats keep the earliest
    users = (out / "u_id_mapping.csv").read_text().splitlines()[1:]
    items = (out / "i_id_mapping.csv").read_text().splitlines()[1:]
    user_of = {int(line.split("\t")[1]): line.split("\t")[0] for line in users}
    item_of = {int(line.split("\t")[1]): line.split("\t")[0] for line in items}
    by_user = defaultdict(lambda: defaultdict(list))
    for line in (out / "shop.inter").read_text().splitlines()[1:]:
        u, i, x = (int(v) for v in line.split("\t"))
        by_user[u][x].append(times[(user_of[u], item_of[i])])
    for u, labels in by_user.items():
        assert max(labels[0]) <= min(labels[1] + labels[2]), u
        if labels[1] and labels[2]:
            assert max(labels[1]) <= min(labels[2]), u


def test_the_random_split_is_seeded(tmp_path):
    interactions, table = _write_raw(tmp_path)
    a = tmp_path / "a" / "s"
    b = tmp_path / "b" / "s"
    c = tmp_path / "c" / "s"
    opts = _options(table, text_cols=(), numeric_cols=())
    prepare_dataset(interactions, a, opts)
    prepare_dataset(interactions, b, opts)
    prepare_dataset(interactions, c, _options(table, text_cols=(), numeric_cols=(), seed=5))
    assert (a / "s.inter").read_text() == (b / "s.inter").read_text()
    assert (a / "s.inter").read_text() != (c / "s.inter").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(user_col="nobody"), r"no column 'nobody'; the header has"),
        (dict(item_id_col="nope"), r"items.csv: no column 'nope'"),
        (dict(split="sideways"), "split must be one of"),
        (dict(split="temporal", time_col=None), "needs the timestamp column"),
        (dict(items=None), "need --items FILE"),
        (dict(kcore=-1), "kcore must be >= 0"),
        (dict(ratios=(0.6, 0.5)), "must leave some train"),
        (dict(numeric_cols=("title",)), r"column 'title': expected a number"),
        (dict(features={"image": "missing.npy"}), "not a readable .npy"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, change, message):
    interactions, table = _write_raw(tmp_path)
    out = tmp_path / "root" / "shop"
    with pytest.raises((ConfigError, DataFormatError), match=message):
        prepare_dataset(interactions, out, _options(table, **change), encoder=_fake_encoder)
    assert not out.exists()
    assert not list((tmp_path / "root").glob(".*")) if (tmp_path / "root").exists() else True


def test_bad_rows_are_named(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("u,i,t\na,x,1\nb,,2\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 3, column 'i': empty value"):
        prepare_dataset(path, tmp_path / "o" / "r", PrepareOptions("u", "i"))
    path.write_text("u,i,t\na,x,1\nb,y,soon\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 3, column 't': expected a number, got 'soon'"):
        prepare_dataset(path, tmp_path / "o" / "r", PrepareOptions("u", "i", time_col="t"))
    interactions, table = _write_raw(tmp_path)
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:-3]) + "\n", encoding="utf-8")  # three items lose their row
    with pytest.raises(DataFormatError, match=r"3 of the 25 interacted items have no row"):
        prepare_dataset(interactions, tmp_path / "o" / "s", _options(table), encoder=_fake_encoder)
    npy = tmp_path / "f.npy"
    np.save(npy, np.ones((7, 3), dtype=np.float32))
    _, table = _write_raw(tmp_path)
    with pytest.raises(DataFormatError, match=r"one row per row of .*items.csv \(25\)"):
        prepare_dataset(
            interactions,
            tmp_path / "o" / "s",
            _options(table, features={"image": npy}),
            encoder=_fake_encoder,
        )
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(ConfigError, match="not an empty folder"):
        prepare_dataset(interactions, out, PrepareOptions("who", "what"))
    assert (out / "x").read_text() == "keep me"


def test_prepare_then_train_then_recommend_by_own_ids(tmp_path, capsys):
    interactions, table = _write_raw(tmp_path, users=60, items=60)
    npy = tmp_path / "img.npy"
    np.save(npy, np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32))
    root = tmp_path / "root"
    args = ["prepare", "--interactions", str(interactions), "--user-col", "who"]
    args += ["--item-col", "what", "--time-col", "when", "--items", str(table)]
    args += ["--item-id-col", "sku", "--numeric-cols", "year", "--feature", f"image={npy}"]
    args += ["--out", str(root / "shop"), "--no-progress"]
    assert app_main(args) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    train = ["train", "--model", "vbpr", "--data-root", str(root), "--dataset", "shop"]
    assert app_main([*train, "--epochs", "2", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert app_main(["recommend", str(run), "--users", "user-007", "--k", "3"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["user"] == "user-007" and len(record["items"]) == 3
    assert all(item.startswith("sku_") for item in record["items"])
    assert (
        app_main(
            [
                "prepare",
                "--interactions",
                str(interactions),
                "--user-col",
                "x",
                "--item-col",
                "what",
                "--out",
                str(root / "other"),
            ]
        )
        == 2
    )
    assert "no column 'x'" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None
    or importlib.util.find_spec("all_minilm_l6_v2") is None,
    reason="the text extra is not installed (pip install torch==2.13.0 -e '.[text]')",
)
def test_text_features_are_the_packaged_minilm_encoding(tmp_path):
    from sentence_transformers import SentenceTransformer

    from cm3_pyg.data.text import default_model_path

    interactions, table = _write_raw(tmp_path, users=12, items=10, per_user=4)
    out = tmp_path / "root" / "shop"
    prepare_dataset(interactions, out, _options(table, numeric_cols=()))
    text = np.load(out / "text_feat.npy")
    assert text.shape == (10, 384)
    ids = [line.split("\t")[0] for line in (out / "i_id_mapping.csv").read_text().splitlines()[1:]]
    strings = [
        f"Title {int(s.split('_')[1]) // 3}, part two. genre{(int(s.split('_')[1]) // 3) % 4}"
        for s in ids
    ]
    model = SentenceTransformer(str(default_model_path()), device="cpu")
    np.testing.assert_allclose(text, model.encode(strings), atol=1e-5)
