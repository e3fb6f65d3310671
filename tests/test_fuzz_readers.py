"""Property-based fuzzing of every reader of user files: arbitrary bytes and mutations of
valid files load cleanly or raise a CM3Error (never another exception, never a hang)."""

from __future__ import annotations

import contextlib
import functools
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cm3_pyg.data.idmaps import read_id_map
from cm3_pyg.data.mmrec import read_mmrec_folder
from cm3_pyg.data.prepare import PrepareOptions, prepare_dataset
from cm3_pyg.errors import CM3Error, DataWarning
from cm3_pyg.training import load_config
from cm3_pyg.training.artifact import load_artifact
from cm3_pyg.training.checkpoint import load_checkpoint

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

VALID_INTER = b"userID\titemID\tx_label\n" + b"".join(
    f"{u}\t{i}\t{x}\n".encode()
    for u, i, x in [
        (0, 0, 0),
        (0, 1, 1),
        (0, 2, 2),
        (1, 1, 0),
        (1, 2, 1),
        (1, 0, 2),
        (2, 2, 0),
        (2, 0, 1),
        (2, 1, 2),
    ]
)


def _feature_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.arange(12, dtype=np.float32).reshape(3, 4))
    return buffer.getvalue()


VALID_FEATURE = _feature_bytes()


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, or the valid file with a slice replaced, cut, or bytes flipped."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["replace", "cut", "flip", "insert"]))
            at = draw(st.integers(0, max(0, len(data) - 1)))
            if kind == "replace":
                data[at : at + draw(st.integers(0, 8))] = draw(st.binary(max_size=8))
            elif kind == "cut":
                del data[at:]
            elif kind == "flip" and data:
                data[at] ^= draw(st.integers(1, 255))
            else:
                data[at:at] = draw(st.binary(max_size=8))
        return bytes(data)

    return st.one_of(st.binary(max_size=300), mutate())


def _clean_or_cm3(call) -> None:
    with warnings.catch_warnings(), contextlib.suppress(CM3Error):
        warnings.simplefilter("ignore", DataWarning)
        call()


@FUZZ
@given(inter=_mutations(VALID_INTER), feature=_mutations(VALID_FEATURE))
def test_mmrec_folder_reader(inter: bytes, feature: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "d"
        folder.mkdir()
        (folder / "d.inter").write_bytes(inter)
        (folder / "image_feat.npy").write_bytes(feature)
        _clean_or_cm3(lambda: read_mmrec_folder(folder))


@FUZZ
@given(text=_mutations(b"gamma: 0.5\ntopk: [10, 20]\nvalid_metric: recall@20\nseed: 3\n"))
def test_config_reader(text: bytes) -> None:
    from cm3_pyg.models import CM3

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(text)
        _clean_or_cm3(lambda: load_config(CM3.default_config(), path))


@FUZZ
@given(text=_mutations(b"asin\titemID\nA\t0\nB\t1\nC\t2\n"))
def test_id_map_reader(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "i_id_mapping.csv"
        path.write_bytes(text)
        _clean_or_cm3(lambda: read_id_map(path, "itemID", 3))


@FUZZ
@given(text=_mutations(b"u,i,t\na,x,1\na,y,2\nb,x,3\nb,y,4\nc,x,5\nc,z,6\n"))
def test_prepare_reader(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.csv"
        path.write_bytes(text)
        options = PrepareOptions("u", "i", time_col="t", split="temporal")
        _clean_or_cm3(lambda: prepare_dataset(path, Path(tmp) / "out" / "r", options))


@functools.cache
def _saved_files() -> dict[str, bytes]:
    """A checkpoint and an artifact of a one-epoch run, built once per process."""
    from cm3_pyg.cli import main

    folder = Path(tempfile.mkdtemp()) / "run"
    argv = ["--model", "bprmf", "--epochs", "1", "--no-progress", "--out", str(folder)]
    assert main([*argv, "--set", "embedding_size=4"]) == 0
    return {name: (folder / name).read_bytes() for name in ("checkpoint.pt", "artifact.pt")}


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_checkpoint_and_artifact_readers(data: st.DataObject) -> None:
    saved = _saved_files()
    name = data.draw(st.sampled_from(sorted(saved)))
    blob = data.draw(_mutations(saved[name]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(blob)
        reader = load_checkpoint if name == "checkpoint.pt" else load_artifact
        _clean_or_cm3(lambda: reader(path))
