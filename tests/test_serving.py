"""The trained-run artifact, external ids, recommend / export / serve / evaluate, cm3-pyg."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from cm3_pyg.cli.app import COMMANDS
from cm3_pyg.cli.app import main as app_main
from cm3_pyg.data.idmaps import IdMap, read_id_map
from cm3_pyg.data.synthetic import make_synthetic_arrays, write_mmrec_folder
from cm3_pyg.errors import CheckpointError, ConfigError, DataFormatError, RequestError
from cm3_pyg.serving import TopK, UnknownUserError, export_embeddings, load_artifact, make_server
from cm3_pyg.training.artifact import ARTIFACT_NAME

SIZES = {"num_users": 120, "num_items": 90, "modality_dims": {"image": 8, "text": 6}, "seed": 2}


def _user_name(i: int) -> str:
    return f"reviewer-{i:04d}"


def _item_name(i: int) -> str:
    return f"B00{i * 7:05d}X"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A LightGCN run on a small MMRec folder with string id maps."""
    root = tmp_path_factory.mktemp("data")
    arrays = make_synthetic_arrays(**SIZES)
    folder = root / "tiny"
    write_mmrec_folder(folder, "tiny", arrays.users, arrays.items, arrays.labels, arrays.features)
    (folder / "u_id_mapping.csv").write_text(
        "user_id\tuserID\n" + "".join(f"{_user_name(i)}\t{i}\n" for i in range(120)),
        encoding="utf-8",
    )
    # items listed out of order: the file's order must not matter
    (folder / "i_id_mapping.csv").write_text(
        "asin\titemID\n" + "".join(f"{_item_name(i)}\t{i}\n" for i in reversed(range(90))),
        encoding="utf-8",
    )
    out = root / "run"
    args = ["--model", "lightgcn", "--data-root", str(root), "--dataset", "tiny", "--epochs", "6"]
    args += ["--set", "embedding_size=16", "--out", str(out), "--no-progress"]
    assert app_main(["train", *args]) == 0
    return out


def _train_pairs(art) -> set[tuple[int, int]]:
    pairs = set()
    for u in range(art.num_users):
        lo, hi = int(art.exclude_ptr[u]), int(art.exclude_ptr[u + 1])
        pairs.update((u, int(i)) for i in art.exclude_items[lo:hi])
    return pairs


# --------------------------------------------------------------------------- artifact
def test_artifact_holds_the_best_validation_epoch(run):
    art = load_artifact(run)
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert art.epoch == metrics["best_epoch"]
    assert art.valid == pytest.approx(metrics["valid"])
    assert art.user_ids[3] == _user_name(3) and art.item_ids[5] == _item_name(5)
    assert art.num_users == 120 and art.num_items == 90
    assert "lightgcn" in repr(art)


def test_evaluate_from_the_artifact_gives_the_runs_test_metrics(run, capsys):
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    root = run.parent
    assert app_main(["evaluate", str(run), "--data-root", str(root)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["epoch"] == metrics["best_epoch"]
    for key, value in metrics["test"].items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_a_corrupt_or_edited_artifact_is_refused(run, tmp_path):
    raw = (run / ARTIFACT_NAME).read_bytes()
    original = load_artifact(run)
    flipped = tmp_path / "flipped.pt"
    refused = 0
    for position in range(0, len(raw) - 16, len(raw) // 25):
        flipped.write_bytes(
            raw[:position]
            + bytes(b ^ 0xFF for b in raw[position : position + 16])
            + raw[position + 16 :]
        )
        try:
            loaded = load_artifact(flipped)
        except CheckpointError:
            refused += 1
            continue
        # bytes the loader never reads (zip padding, names): the content must be intact
        assert repr(loaded) == repr(original) and loaded.user_ids == original.user_ids
        assert torch.equal(loaded.item_embeddings, original.item_embeddings)
        assert torch.equal(loaded.user_embeddings, original.user_embeddings)
    assert refused > 0
    payload = torch.load(run / ARTIFACT_NAME, weights_only=True)
    payload["item_embeddings"][0, 0] += 1.0  # a valid file whose content changed
    edited = tmp_path / "edited.pt"
    torch.save(payload, edited)
    with pytest.raises(CheckpointError, match="checksum"):
        load_artifact(edited)
    with pytest.raises(CheckpointError, match="no trained-run artifact"):
        load_artifact(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- recommend
def test_recommend_matches_a_brute_force_ranking_in_external_ids(run):
    art = load_artifact(run)
    top_k = TopK(art)
    users = [_user_name(u) for u in (0, 7, 7, 119)]
    records = top_k.recommend(users, k=10)
    scores = art.user_embeddings.double() @ art.item_embeddings.double().t()
    train = _train_pairs(art)
    for name, record in zip(users, records, strict=True):
        u = int(name.split("-")[1])
        ranked = sorted(
            (i for i in range(art.num_items) if (u, i) not in train),
            key=lambda i: -float(scores[u, i]),
        )
        assert record["user"] == name
        assert record["items"] == [_item_name(i) for i in ranked[:10]]
        assert record["scores"] == pytest.approx(
            [float(scores[u, i]) for i in ranked[:10]], abs=1e-5
        )
    with_train = top_k.recommend([users[1]], k=10, exclude_train=False)[0]
    best = scores[7].argsort(descending=True)[:10].tolist()
    assert with_train["items"] == [_item_name(i) for i in best]


def test_recommend_refuses_unknown_users_and_bad_k(run):
    top_k = TopK(run, max_k=50)
    with pytest.raises(UnknownUserError, match="'nobody'"):
        top_k.recommend(["nobody"], k=5)
    with pytest.raises(UnknownUserError):
        top_k.recommend(["7"], k=5)  # an internal id is not an external one here
    for k in (0, -1, 51, 2.5, True):
        with pytest.raises(RequestError, match=r"k must be an integer in \[1, 50\]"):
            top_k.recommend([_user_name(1)], k=k)
    with pytest.raises(ValueError, match="max_k"):
        TopK(run, max_k=0)


def test_recommend_command_across_processes(run, tmp_path):
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"{_user_name(3)}\n\n{_user_name(11)}\n", encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cm3_pyg",
            "recommend",
            str(run),
            "--users-file",
            str(users_file),
            "--k",
            "4",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines == TopK(run).recommend([_user_name(3), _user_name(11)], k=4)
    bad = subprocess.run(
        [sys.executable, "-m", "cm3_pyg", "recommend", str(run), "--users", "ghost", "--k", "4"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: unknown user 'ghost'") and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- export
def test_export_writes_embeddings_in_id_order(run, tmp_path):
    art = load_artifact(run)
    out = tmp_path / "export"
    summary = export_embeddings(art, out)
    assert summary["users"] == 120 and summary["items"] == 90 and summary["dim"] == 16
    users = np.load(out / "user_embeddings.npy")
    ids = (out / "user_ids.txt").read_text(encoding="utf-8").splitlines()
    assert ids[5] == _user_name(5)
    np.testing.assert_array_equal(users, art.user_embeddings.numpy())
    items = (out / "item_ids.txt").read_text(encoding="utf-8").splitlines()
    assert items == [_item_name(i) for i in range(90)]
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_embeddings(art, out)


# --------------------------------------------------------------------------- serve
def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_server_answers_recommend_requests(run):
    top_k = TopK(run, max_k=30)
    server = make_server(top_k, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = server.url
        status, body = _get(f"{base}/recommend?user={_user_name(9)}&k=5")
        assert status == 200 and body == top_k.recommend([_user_name(9)], k=5)[0]
        status, body = _get(f"{base}/recommend?user={_user_name(9)}")
        assert status == 200 and len(body["items"]) == 20  # the default k
        status, body = _get(f"{base}/recommend?user=ghost&k=5")
        assert status == 404 and "unknown user 'ghost'" in body["error"]
        for query in (
            "k=5",
            f"user={_user_name(1)}&k=0",
            f"user={_user_name(1)}&k=31",
            f"user={_user_name(1)}&k=many",
        ):
            status, body = _get(f"{base}/recommend?{query}")
            assert status == 400 and body["error"], query
        status, body = _get(f"{base}/elsewhere")
        assert status == 404
        status, body = _get(f"{base}/health")
        assert status == 200 and body["model"] == "lightgcn" and body["max_k"] == 30
        request = urllib.request.Request(f"{base}/recommend?user=x", method="POST", data=b"")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 405
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --------------------------------------------------------------------------- id maps
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("asin\tother\nA\t0\n", "one named 'itemID'"),
        ("asin\titemID\nA\t0\nB\t0\n", "listed twice"),
        ("asin\titemID\nA\t0\nA\t1\n", "already maps to 0"),
        ("asin\titemID\nA\t0\n", "1 of 2 ids have no row"),
        ("asin\titemID\nA\t0\nB\t2\n", "line 3.*not an id"),
        ("asin\titemID\nA\tzero\n", "line 2.*expected an integer"),
        ("asin\titemID\n\t0\nB\t1\n", "empty external id"),
    ],
)
def test_id_map_files_are_checked(tmp_path, text, message):
    path = tmp_path / "i_id_mapping.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        read_id_map(path, "itemID", 2)


def test_id_map_both_ways():
    ids = IdMap(["a", "", "c"])
    assert ids.to_internal("c") == 2 and ids.to_external(0) == "a"
    assert "" not in ids and "b" not in ids and len(ids) == 3
    with pytest.raises(ValueError, match="unique"):
        IdMap(["a", "a"])


# --------------------------------------------------------------------------- unlearned runs
def test_an_unlearned_run_serves_without_the_forgotten_users_and_items(run, tmp_path):
    from cm3_pyg.unlearning import ForgetRequest, unlearn_run

    root = run.parent
    users = unlearn_run(
        run, ForgetRequest("users", torch.tensor([4, 9])), tmp_path / "u", data_root=str(root)
    )
    assert users["request"]["kind"] == "users"
    top_k = TopK(tmp_path / "u")
    for forgotten in (_user_name(4), _user_name(9)):
        with pytest.raises(UnknownUserError):
            top_k.recommend([forgotten], k=3)
    assert top_k.recommend([_user_name(5)], k=3)[0]["items"]
    items = torch.tensor([2, 30, 61])
    unlearn_run(run, ForgetRequest("items", items), tmp_path / "i", data_root=str(root))
    art = load_artifact(tmp_path / "i")
    assert all(art.item_ids[i] == "" for i in items.tolist())
    listed = TopK(art).recommend([_user_name(u) for u in range(120)], k=87)
    gone = {_item_name(i) for i in items.tolist()}
    assert all(not gone & set(record["items"]) for record in listed)
    train = _train_pairs(art)
    for u, record in enumerate(listed):
        # a list is cut short only by what is excluded: the user's train items and the gone
        kept = {i for (v, i) in train if v == u} - set(items.tolist())
        assert len(record["items"]) == min(87, 90 - 3 - len(kept))


# --------------------------------------------------------------------------- cm3-pyg
def test_cm3_pyg_lists_its_commands_and_each_has_help(capsys):
    assert app_main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    assert app_main([]) == 2
    assert app_main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err
    for name in COMMANDS:
        with pytest.raises(SystemExit) as info:
            app_main([name, "--help"])
        assert info.value.code == 0
        assert f"cm3-pyg {name}" in capsys.readouterr().out


# --------------------------------------------------------------------------- analysis, curves
def test_embedding_geometry_matches_a_brute_force_computation():
    from cm3_pyg.experiments.analysis import embedding_geometry

    gen = torch.Generator().manual_seed(0)
    users, items = torch.randn(30, 6, generator=gen), torch.randn(20, 6, generator=gen) * 3
    pairs = torch.stack(
        [torch.randint(0, 30, (40,), generator=gen), torch.randint(0, 20, (40,), generator=gen)]
    )
    got = embedding_geometry(users, items, pairs)
    u = users.double() / users.double().norm(dim=1, keepdim=True)
    i = items.double() / items.double().norm(dim=1, keepdim=True)
    align = sum(float(((u[a] - i[b]) ** 2).sum()) for a, b in pairs.t().tolist()) / 40

    def unif(x):
        terms = [
            float(torch.exp(-2 * ((x[a] - x[b]) ** 2).sum()))
            for a in range(len(x))
            for b in range(a + 1, len(x))
        ]
        return float(np.log(sum(terms) / len(terms)))

    assert got["align"] == pytest.approx(align, rel=1e-9)
    assert got["unif_users"] == pytest.approx(unif(u), rel=1e-9)
    assert got["unif_items"] == pytest.approx(unif(i), rel=1e-9)
    sampled = embedding_geometry(users, items, pairs, max_rows=10)
    assert sampled["users"] == 10 and sampled["items"] == 10
    with pytest.raises(ValueError, match="pairs"):
        embedding_geometry(users, items, torch.zeros(2, 0, dtype=torch.long))


def test_analyze_command_writes_the_table_and_plot(run, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert app_main(["analyze", str(run), "--out", str(out), "--data-root", str(run.parent)]) == 0
    report = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    row = report[str(run)]
    assert row["model"] == "lightgcn" and row["align"] > 0 and row["unif_items"] < 0
    has_plot = importlib.util.find_spec("matplotlib") is not None
    assert (out / "analysis.png").exists() == has_plot
    assert (run / "curves.png").exists() == has_plot


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed"
)
def test_tensorboard_scalars_match_epochs_csv(tmp_path):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert (
        app_main(["train", "--model", "bprmf", "--epochs", "3", "--out", str(out), "--no-progress"])
        == 0
    )
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = list(csv.DictReader((out / "epochs.csv").open(encoding="utf-8")))
    loss = [s.value for s in events.Scalars("train/loss")]
    recall = [s.value for s in events.Scalars("valid/recall@20")]
    assert loss == pytest.approx([float(r["train_loss"]) for r in rows], abs=1e-5)
    assert recall == pytest.approx([float(r["valid_recall@20"]) for r in rows], abs=1e-5)


def test_unlearn_requests_name_the_datasets_own_ids(run, tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text(f"{_user_name(12)}\n{_user_name(30)}\n", encoding="utf-8")
    out = tmp_path / "unlearned"
    args = ["unlearn", "--run", str(run), "--forget-users", str(users), "--out", str(out)]
    assert app_main([*args, "--data-root", str(run.parent)]) == 0
    top_k = TopK(out)
    assert _user_name(12) not in top_k.users and _user_name(30) not in top_k.users
    assert _user_name(13) in top_k.users
    edges = tmp_path / "edges.tsv"
    art = load_artifact(run)
    u = 3
    item = int(art.exclude_items[int(art.exclude_ptr[u])])
    edges.write_text(f"{_user_name(u)}\t{_item_name(item)}\n", encoding="utf-8")
    out2 = tmp_path / "edge-unlearned"
    args = ["unlearn", "--run", str(run), "--forget-edges", str(edges), "--out", str(out2)]
    assert app_main([*args, "--data-root", str(run.parent)]) == 0
    report = json.loads((out2 / "unlearn.json").read_text(encoding="utf-8"))
    assert report["request"] == {"kind": "edges", "count": 1}
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{_user_name(1)}\n12\n", encoding="utf-8")  # an internal id is not one
    out3 = tmp_path / "never"
    args = ["unlearn", "--run", str(run), "--forget-users", str(bad), "--out", str(out3)]
    capsys.readouterr()
    assert app_main([*args, "--data-root", str(run.parent)]) == 2
    assert "line 2: unknown id '12'" in capsys.readouterr().err
    assert not out3.exists()


def test_load_run_gives_the_same_model_in_another_process(run):
    from cm3_pyg import load_run

    here = load_run(run, data_root=str(run.parent)).recommend(torch.tensor([0, 5, 9]), k=7)
    code = (
        "import json, sys, torch, cm3_pyg\n"
        f"r = cm3_pyg.load_run({str(run)!r}, data_root={str(run.parent)!r})\n"
        "print(json.dumps(r.recommend(torch.tensor([0, 5, 9]), k=7).tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == here.tolist()


def test_inference_commands_turn_os_errors_into_one_line(run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert app_main(["export", str(run), "--out", str(blocker / "below")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "a-file" in err and ("File exists" in err or "Not a directory" in err)
    analysis = ["analyze", str(run), "--out", str(blocker / "x"), "--data-root", str(run.parent)]
    assert app_main(analysis) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "a-file" in err
