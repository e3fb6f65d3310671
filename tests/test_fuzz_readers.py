"""Property-based fuzzing of every reader of user files and of the CLI's argument surface:
arbitrary bytes and mutations of valid files load cleanly or raise a CM3Error (never another
exception, never a hang); arbitrary command lines end with exit 0 or one ``error:`` line.

Each property runs twice: a bounded version in the normal suite and a ``slow`` one with
:data:`LONG_EXAMPLES` examples (``pytest -m slow tests/test_fuzz_readers.py``; its record is
``benchmarks/results/fuzz-long.md``)."""

from __future__ import annotations

import contextlib
import functools
import io
import signal
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cm3_pyg.data.idmaps import read_id_map
from cm3_pyg.data.mmrec import read_mmrec_folder
from cm3_pyg.data.prepare import PrepareOptions, prepare_dataset
from cm3_pyg.errors import CM3Error, DataWarning
from cm3_pyg.models import registered_models
from cm3_pyg.training import load_config
from cm3_pyg.training.artifact import load_artifact
from cm3_pyg.training.checkpoint import load_checkpoint

#: examples per property in the long (``slow``) run
LONG_EXAMPLES = 10_000
_QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=_QUIET)
LONG = settings(max_examples=LONG_EXAMPLES, deadline=None, suppress_health_check=_QUIET)


def _fast_and_long(body, examples: int = 40, long_examples: int = LONG_EXAMPLES, **strategies):
    """``(fast test, slow test)``: ``body`` under ``given(**strategies)`` twice, with a
    bounded and a long example budget (two wrappers, so each keeps its own settings)."""
    fast = settings(FUZZ, max_examples=examples)(given(**strategies)(body))
    slow = settings(LONG, max_examples=long_examples)(given(**strategies)(body))
    return fast, pytest.mark.slow(slow)


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


def _mmrec_folder_reader(inter: bytes, feature: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "d"
        folder.mkdir()
        (folder / "d.inter").write_bytes(inter)
        (folder / "image_feat.npy").write_bytes(feature)
        _clean_or_cm3(lambda: read_mmrec_folder(folder))


test_mmrec_folder_reader, test_mmrec_folder_reader_long = _fast_and_long(
    _mmrec_folder_reader, inter=_mutations(VALID_INTER), feature=_mutations(VALID_FEATURE)
)


#: found by the long run: numpy parses a .npy header with the tokenizer and ast, so a
#: damaged one raised SyntaxError / tokenize.TokenError
DAMAGED_NPY_HEADERS = [
    b"\x93NUMPY\x01\x00\x13\x00" + b"\x00" * 18 + b"{",
    b"\x93NUMPY\x01\x00\x06\x00\x00\x00\x00'''",
]


@pytest.mark.parametrize("feature", DAMAGED_NPY_HEADERS)
def test_damaged_npy_header_is_a_data_error(tmp_path, feature: bytes) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "d.inter").write_bytes(VALID_INTER)
    (folder / "image_feat.npy").write_bytes(feature)
    with pytest.raises(CM3Error, match=r"image_feat\.npy: not a valid \.npy file"):
        read_mmrec_folder(folder)
    table = tmp_path / "r.csv"
    table.write_text("u,i\na,x\na,y\nb,x\nb,y\n")
    (tmp_path / "items.csv").write_text("i\nx\ny\n")
    (tmp_path / "f.npy").write_bytes(feature)
    features = {"image": tmp_path / "f.npy"}
    options = PrepareOptions(
        "u", "i", items=tmp_path / "items.csv", item_id_col="i", features=features
    )
    with pytest.raises(CM3Error, match=r"f\.npy: not a readable \.npy array"):
        prepare_dataset(table, tmp_path / "out" / "r", options)


def _config_reader(text: bytes) -> None:
    from cm3_pyg.models import CM3

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(text)
        _clean_or_cm3(lambda: load_config(CM3.default_config(), path))


test_config_reader, test_config_reader_long = _fast_and_long(
    _config_reader,
    text=_mutations(b"gamma: 0.5\ntopk: [10, 20]\nvalid_metric: recall@20\nseed: 3\n"),
)


def _id_map_reader(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "i_id_mapping.csv"
        path.write_bytes(text)
        _clean_or_cm3(lambda: read_id_map(path, "itemID", 3))


test_id_map_reader, test_id_map_reader_long = _fast_and_long(
    _id_map_reader, text=_mutations(b"asin\titemID\nA\t0\nB\t1\nC\t2\n")
)


def _prepare_reader(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.csv"
        path.write_bytes(text)
        options = PrepareOptions("u", "i", time_col="t", split="temporal")
        _clean_or_cm3(lambda: prepare_dataset(path, Path(tmp) / "out" / "r", options))


test_prepare_reader, test_prepare_reader_long = _fast_and_long(
    _prepare_reader, text=_mutations(b"u,i,t\na,x,1\na,y,2\nb,x,3\nb,y,4\nc,x,5\nc,z,6\n")
)


@functools.cache
def _saved_files() -> dict[str, bytes]:
    """A checkpoint and an artifact of a one-epoch run, built once per process."""
    from cm3_pyg.cli import main

    folder = Path(tempfile.mkdtemp()) / "run"
    argv = ["--model", "bprmf", "--epochs", "1", "--no-progress", "--out", str(folder)]
    assert main([*argv, "--set", "embedding_size=4"]) == 0
    return {name: (folder / name).read_bytes() for name in ("checkpoint.pt", "artifact.pt")}


def _checkpoint_and_artifact_readers(data: st.DataObject) -> None:
    saved = _saved_files()
    name = data.draw(st.sampled_from(sorted(saved)))
    blob = data.draw(_mutations(saved[name]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(blob)
        reader = load_checkpoint if name == "checkpoint.pt" else load_artifact
        _clean_or_cm3(lambda: reader(path))


test_checkpoint_and_artifact_readers, test_checkpoint_and_artifact_readers_long = _fast_and_long(
    _checkpoint_and_artifact_readers, examples=25, data=st.data()
)


# ----------------------------------------------------------------------------- CLI surface


@functools.cache
def _tiny_dataset() -> Path:
    """A 40-user, 60-item MMRec folder (image + text), built once per process (more items
    than the largest default top-k, so a default config trains on it)."""
    from cm3_pyg.data.synthetic import make_synthetic_arrays, write_mmrec_folder

    arrays = make_synthetic_arrays(
        num_users=40, num_items=60, modality_dims={"image": 4, "text": 3}, seed=5
    )
    root = Path(tempfile.mkdtemp())
    write_mmrec_folder(
        root / "tiny", "tiny", arrays.users, arrays.items, arrays.labels, arrays.features
    )
    return root


def _yaml(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True).split("\n...")[0].strip()


#: the config keys of every model (train's ``--set``), and a few that do not exist
_KEYS = sorted({key for cls in registered_models().values() for key in cls.default_config()})
_KEYS += ["nope", "", "=", "grid"]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.lists(st.integers(-3, 60), max_size=4),
    st.dictionaries(st.sampled_from(["image", "text", "audio"]), st.floats(-1, 2), max_size=3),
)
_WORDS = st.sampled_from(
    [
        "recall@10",
        "ndcg@5",
        "cpu",
        "cuda:7",
        "auto",
        "csr",
        "bpr",
        "nbpo",
        "image",
        "[5, 10]",
        "{image: 1}",
        "[image]",
        "'",
        "[",
        "{",
        "!!python/object:os.system",
        ".nan",
        "1e400",
    ]
)
#: a --set value: YAML of a scalar, list or mapping, free text, or a tricky word
_VALUES = st.one_of(
    _SCALARS.map(_yaml),
    st.text(max_size=12),
    _WORDS,
)
#: ``train`` and ``compare`` get bounds appended (tiny data, one epoch, one seed, one point)
_COMMANDS = [
    "train",
    "compare",
    "evaluate",
    "recommend",
    "export",
    "analyze",
    "validate",
    "prepare",
    "unlearn",
    "bogus",
]
_FLAGS = [
    "--model",
    "--epochs",
    "--seed",
    "--cold-items",
    "--config",
    "--run",
    "--k",
    "--users",
    "--out",
    "--format",
    "--models",
    "--seeds",
    "--request",
    "--data-root",
    "--dataset",
    "--inter",
    "--overwrite",
    "--force-reload",
    "--resume",
    "--grid",
    "--batch-size",
    "-h",
    "--no-progress",
    "--port",
    "--user-col",
    "--item-col",
]


@st.composite
def _command_lines(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(_COMMANDS))
    argv: list[str] = [command]
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            argv += ["--set", f"{draw(st.sampled_from(_KEYS))}={draw(_VALUES)}"]
        else:
            argv.append(draw(st.sampled_from(_FLAGS)))
            if draw(st.booleans()):
                argv.append(
                    draw(
                        st.one_of(
                            _VALUES, st.sampled_from(["cm3", "lightgcn", "sea", "-1", "0", "1.5"])
                        )
                    )
                )
    return argv


def _values_near(default: object) -> st.SearchStrategy[str]:
    """``--set`` values for a key with this default: mostly of its type and near it (so most
    command lines get past the checks and train), sometimes anything."""
    if isinstance(default, bool):
        typed = st.booleans().map(_yaml)
    elif isinstance(default, int):
        typed = st.one_of(
            st.sampled_from([default, default + 1, 2 * default, 0, 1, -1]), st.integers(-2, 40)
        ).map(_yaml)
    elif isinstance(default, float):
        typed = st.one_of(
            st.sampled_from([default, default / 2, 2 * default, -default, 0.0, 1.0]),
            st.floats(-0.5, 1.5, width=32),
        ).map(_yaml)
    else:
        typed = st.just(_yaml(default))
    return st.one_of(typed, typed, _VALUES)


@st.composite
def _train_command_lines(draw: st.DrawFn) -> list[str]:
    """``train --model M`` with up to four ``--set`` values of M's own config keys, mostly
    near their defaults: the surface where a value passes the flag parser and reaches the
    model, the data and training."""
    model = draw(st.sampled_from(sorted(registered_models())))
    config = registered_models()[model].default_config()
    argv = ["train", "--model", model]
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(sorted(config)))
        argv += ["--set", f"{key}={draw(_values_near(config[key]))}"]
    return argv


class _ExampleTimeout(BaseException):
    """Raised by the alarm inside a fuzzed command that ran past its bound (a BaseException,
    so no handler of the CLI turns a hang into an exit code)."""


@contextlib.contextmanager
def _time_bound(seconds: float):
    def alarm(signum: int, frame: object) -> None:
        raise _ExampleTimeout(f"example ran past {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


#: per example; the bounded train or compare lines finish in seconds on the tiny data
EXAMPLE_SECONDS = 120.0


def _bounded(argv: list[str], root: Path, tmp: str) -> list[str]:
    """``argv`` with flags appended (argparse keeps the last) that keep a train or compare
    small and inside ``tmp``: the tiny dataset, one epoch, a fresh --out, one seed and point."""
    if argv[0] not in ("train", "compare"):
        return argv
    bounds = ["--data-root", str(root), "--dataset", "tiny", "--epochs", "1"]
    bounds += ["--out", str(Path(tmp) / "run"), "--cache-dir", tmp]
    if argv[0] == "train":
        return [*argv, *bounds, "--no-progress"]
    return [*argv, *bounds, "--seeds", "7", "--budget", "1"]


def _cli_surface(argv: list[str]) -> None:
    from cm3_pyg.cli.app import main as app_main

    root = _tiny_dataset()
    with tempfile.TemporaryDirectory() as tmp:
        argv = _bounded(argv, root, tmp)
        stderr = io.StringIO()
        # in tmp, so a relative --out of a fuzzed command line lands there, not in the repo
        with (
            contextlib.chdir(tmp),
            contextlib.redirect_stderr(stderr),
            contextlib.redirect_stdout(io.StringIO()),
            _time_bound(EXAMPLE_SECONDS),
        ):
            try:
                code = app_main(argv)
            except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
                code = exit_.code
        text = stderr.getvalue()
    # the share of each exit code shows in --hypothesis-show-statistics (the long record)
    event(f"{argv[0]} exit {code}")
    assert code in (0, 2, 3), (argv, code, text[-2000:])
    assert "Traceback" not in text, (argv, text[-2000:])
    if code == 2:
        lines = [line for line in text.strip().splitlines() if line]
        # exactly one error line (an unknown command's is followed by the command list)
        assert sum("error:" in line for line in lines) == 1, (argv, text[-2000:])


test_cli_surface, test_cli_surface_long = _fast_and_long(
    _cli_surface,
    examples=30,
    long_examples=2_000,
    argv=_command_lines(),
)
test_cli_train_values, test_cli_train_values_long = _fast_and_long(
    _cli_surface,
    examples=10,
    long_examples=1_000,
    argv=_train_command_lines(),
)
