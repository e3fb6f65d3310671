"""Time a public reference implementation (CM3, or any model of an MMRec-framework
repository) on this machine.

    python -m benchmarks.reference_cm3 --reference-dir ~/src/CM3 --scale tiktok --epochs 2
    python -m benchmarks.reference_cm3 --reference-dir ~/src/MMRec --model FREEDOM --scale baby

The reference (github.com/enoche/CM3, and for the other models github.com/enoche/MMRec,
enoche/LIRDRec and bruno686/SEA, all built on the MMRec framework) is never part of this
repository. ``model`` names the reference's model class (``src/models/<name>.py``, matched
without regard to case, as SEA ships ``SEA.py`` where the framework imports ``sea``), and
``config`` gives single values for the keys its YAML lists as a search grid.

The caller names a checkout (the folder that holds ``src/``); each run
copies that checkout into a fresh temporary folder, lays out a dataset there in the
reference's own format (symlinks to the real interaction and feature files, or generated
features), and runs the reference's own code in a subprocess whose working directory is
the copied ``src/``. That subprocess (a small driver written by this module, see
``_DRIVER``) prints one JSON line, which :func:`time_reference` parses and returns.

What is timed, in the reference's own objects:

* ``build_seconds``: constructing the reference's CM3 model (interaction adjacency plus
  the dense all-pairs cosine kNN item graphs of both modalities; the model's on-disk
  cache of that graph never exists in the fresh folder, so it is always built).
* ``epoch_seconds``: per epoch, exactly the span the reference's ``Trainer.fit`` reports
  as ``epoch N training [time: ...]``: ``pre_epoch_processing``, ``Trainer._train_epoch``
  over its ``TrainDataLoader`` (DataFrame shuffle, per-batch pandas slicing and per-row
  Python negative sampling, forward, backward, Adam step) and the LR-scheduler step.
* ``eval_seconds``: one full-ranking ``Trainer.evaluate`` on the validation split
  (``fit`` also runs one on the test split each epoch; that is not included anywhere).
* ``peak_rss_mib``: the peak resident set size of the subprocess (``os.wait4``'s
  per-child ``ru_maxrss``, KiB on Linux).

Compatibility fixes, applied inside the subprocess before the reference is imported and
without touching the model or training code (see ``_DRIVER``):

* numpy >= 1.24 removed the builtin aliases (``np.float`` and friends) that the
  reference's metrics use: they are restored as the builtins they aliased.
* scipy >= 1.11 dropped ``dok_matrix._update``, which the reference's interaction
  adjacency construction calls: it is restored with the old semantics (an unchecked
  bulk insert into the matrix's key/value store).
* the reference imports torchvision, PIL, lmdb and matplotlib at module level for image
  and plotting code that CM3 never calls; whichever of them is not installed is stubbed
  in ``sys.modules`` (a stub raises if anything in it is actually used).
* the device is forced to the CPU through the config (``use_gpu: False``).
* a model file whose name differs from the lower-cased class name only in case is copied
  to the lower-cased name in the run's copy of the checkout (the framework imports
  ``models.<name.lower()>``).
* SEA's model reads a user-user graph at construction (``user_graph_dict.npy``, made by
  MMRec's DualGNN preprocessing script; its training never uses it): the harness computes
  the same graph (:func:`user_graph_dict`) into the run's data folder.
* ``wandb`` (imported by SEA's trainer for logging the driver never calls) is stubbed
  like the image packages when it is not installed.
* on the CPU the reference's ``result_embed`` stays an ``nn.Parameter`` after
  ``.to(device)`` (on CUDA ``.to`` returns a plain tensor), so it would be registered as a
  parameter and the forward pass's plain-tensor assignment to it would fail; right after
  construction the driver turns it back into the plain tensor attribute it is on CUDA
  (it is overwritten by every forward pass and holds no trained state).

The reference needs pandas (and pyyaml, scipy, torch, numpy) in the interpreter that
runs it (``python``, default: this interpreter); pandas is not a dependency of
cm3_pyg, so install it there or add a folder that has it to ``PYTHONPATH``.

Scales:

* ``tiktok``: the real TikTok data (``tiktok.inter``, ``image_feat.npy`` as the vision
  feature, ``audio_feat.npy`` in the reference's text slot, as in our parity run).
* ``baby``: the real Amazon-Baby graph (``baby/baby.inter``) with features of MMRec's
  shapes (image 4096, text 384) from :func:`benchmarks.scales.generated_features`, the
  same generator our side of the benchmark uses, so both train on identical inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.scales import MMREC_FEATURE_DIMS, generated_features
from cm3_pyg import _hugepages
from cm3_pyg.data.loading import DATA_ROOT_ENV

REPO = Path(__file__).resolve().parents[1]
#: ``$CM3_DATA_ROOT`` or ``../shared/data`` beside the repository.
DEFAULT_DATA_ROOT = os.environ.get(DATA_ROOT_ENV, str(REPO.parent / "shared" / "data"))

SCALES = ("tiktok", "baby")
#: Seed of :func:`benchmarks.scales.generated_features` for the ``baby`` scale.
BABY_FEATURE_SEED = 0

#: The reference's CM3 defaults as used for parity (single values, no grid search).
REFERENCE_CONFIG: dict[str, Any] = {
    "n_ui_layers": 3,
    "gamma": 0.9,
    "max_sim": 1.0,
    "min_sim": 0.0,
    "alpha": 0.5,
    "knn_k": 10,
    "mm_image_weight": 0.1,
    "n_mm_layers": 1,
    "embedding_size": 64,
    "feat_embed_dim": 64,
    "weight_decay": 0.0,
    "dropout": 0.0,
    "learning_rate": 0.001,
    "train_batch_size": 2048,
    "seed": 999,
    "hyper_parameters": ["seed"],
}

_RESULT_PREFIX = "CM3_REFERENCE_RESULT "
_ERROR_PREFIX = "CM3_REFERENCE_ERROR "
_COPY_IGNORE = (".git", "data", "log", "saved", "recommend_topk", "__pycache__", "*.pyc")

# The driver runs in the subprocess with cwd = the copied src/. It is this module's own
# code: it only imports and calls the reference's classes, in the order its quick_start
# does, with timers around the pieces described in the module docstring.
_DRIVER = r"""
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
import types

ARGS = json.loads(sys.argv[1])
RESULT_PREFIX = ARGS["result_prefix"]
ERROR_PREFIX = ARGS["error_prefix"]


def log(msg):
    print(f"[reference-driver] {msg}", file=sys.stderr, flush=True)


def fail(msg, code=3):
    print(ERROR_PREFIX + json.dumps({"error": msg}), flush=True)
    sys.exit(code)


# --- interpreter checks -----------------------------------------------------------------
missing = [m for m in ("pandas", "yaml", "scipy", "numpy", "torch")
           if importlib.util.find_spec(m) is None]
if missing:
    fail(f"the reference needs {', '.join(missing)} in {sys.executable} "
         "(install it there, or put a folder that has it on PYTHONPATH)")

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402

if ARGS["threads"] is not None:
    torch.set_num_threads(int(ARGS["threads"]))
fixes = []

# --- compat 1: numpy >= 1.24 removed the builtin aliases (the reference's metrics use
# np.float); restore them as the builtins they always were.
for _name, _builtin in (("float", float), ("int", int), ("bool", bool),
                        ("object", object), ("complex", complex), ("str", str)):
    if _name not in np.__dict__:
        try:
            setattr(np, _name, _builtin)
            fixes.append(f"numpy.{_name} = {_builtin.__name__}")
        except Exception:  # pragma: no cover - numpy refuses: leave it
            pass

# --- compat 2: scipy >= 1.11 dropped dok_matrix._update (used for the user-item
# adjacency). Old semantics: a bulk, unchecked insert of {(row, col): value}. Newer
# scipy keeps the entries in `_dict` (its public `update` does the same insert, checked).
if not hasattr(sp.dok_matrix, "_update"):
    def _update(self, data):
        store = getattr(self, "_dict", None)
        if store is not None:
            store.update(data)
        else:
            self.update(data)
    sp.dok_matrix._update = _update
    fixes.append("scipy.sparse.dok_matrix._update restored (bulk insert into _dict)")


# --- compat 3: module-level imports of image / plotting packages CM3 never uses.
class _Unavailable:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a stub (package not installed)")

    def __repr__(self):
        return f"<stub {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


_stubbed = [m for m in ("torchvision", "PIL", "lmdb", "matplotlib", "wandb")
            if importlib.util.find_spec(m) is None]
if _stubbed:
    sys.meta_path.insert(0, _StubFinder(_stubbed))
    fixes.append("stubbed unused imports: " + ", ".join(_stubbed))
os.environ.setdefault("MPLBACKEND", "Agg")

# --- the reference ------------------------------------------------------------------------
sys.path.insert(0, os.getcwd())
from utils.configurator import Config  # noqa: E402
from utils.dataloader import EvalDataLoader, TrainDataLoader  # noqa: E402
from utils.dataset import RecDataset  # noqa: E402
from utils.utils import get_model, get_trainer, init_seed  # noqa: E402

t0 = time.perf_counter()
# compat 4: use_gpu False in the config dict -> the reference's Config picks the CPU.
config = Config(ARGS["model"], ARGS["dataset"], dict(ARGS["config"]))
fixes.append(f"config use_gpu=False -> device {config['device']}")
dataset = RecDataset(config)
train_ds, valid_ds, test_ds = dataset.split()
# quick_start logs str() of every split; the loaders rely on that: RecDataset.__str__ is
# what sets the `inter_num` attribute they read.
for _ds in (dataset, train_ds, valid_ds, test_ds):
    str(_ds)
train_data = TrainDataLoader(config, train_ds, batch_size=config["train_batch_size"],
                             shuffle=True)
valid_data = EvalDataLoader(config, valid_ds, additional_dataset=train_ds,
                            batch_size=config["eval_batch_size"])
data_seconds = time.perf_counter() - t0
log(f"data loaded in {data_seconds:.2f}s: {dataset.get_user_num()} users, "
    f"{dataset.get_item_num()} items, {len(train_ds)} training interactions, "
    f"{len(train_data)} batches")

init_seed(config["seed"])
train_data.pretrain_setup()
dataset_dir = os.path.abspath(config["data_path"] + config["dataset"])
for f in os.listdir(dataset_dir):  # never time a cached kNN graph
    if f.startswith("mm_adj_") and f.endswith(".pt"):
        os.remove(os.path.join(dataset_dir, f))
t0 = time.perf_counter()
import inspect  # noqa: E402

# Construction as the reference's own quick_start does it: SEA's model takes its command-line
# namespace as a third argument and its trainer a CLUB network.
model_class = get_model(config["model"])
extra = []
if "args" in inspect.signature(model_class.__init__).parameters:
    extra.append(types.SimpleNamespace(**(ARGS["model_args"] or {})))
model = model_class(config, train_data, *extra).to(config["device"])
build_seconds = time.perf_counter() - t0
log(f"model built in {build_seconds:.2f}s")

# compat 5: on CUDA `nn.Parameter(...).to(device)` returns a plain tensor, on the CPU the
# Parameter itself, which nn.Module registers; the forward pass then assigns a plain tensor
# to that name and nn.Module refuses. Make it the plain attribute it is on CUDA (it is
# recomputed by every forward pass), before the optimizer collects the parameters.
if "result_embed" in model._parameters:
    _re = model._parameters.pop("result_embed")
    model.result_embed = _re.detach()
    fixes.append("result_embed kept as a plain tensor (as on CUDA), not a Parameter")

trainer_class = get_trainer()
if "club" in inspect.signature(trainer_class.__init__).parameters:
    club_class = getattr(sys.modules[model_class.__module__], "CLUBSample")
    club = club_class(device=config["device"], **(ARGS["club"] or {}))
    trainer = trainer_class(config, model, club, False)
else:
    trainer = trainer_class(config, model)
epoch_seconds, epoch_losses = [], []
for epoch in range(ARGS["epochs"]):
    # the span Trainer.fit reports as "epoch N training [time: ...]"
    start = time.time()
    model.pre_epoch_processing()
    train_loss, _ = trainer._train_epoch(train_data, epoch)
    nan = torch.is_tensor(train_loss)
    if not nan:
        trainer.lr_scheduler.step()
    end = time.time()
    loss = float("nan") if nan else float(sum(train_loss) if isinstance(train_loss, tuple)
                                          else train_loss)
    epoch_seconds.append(end - start)
    epoch_losses.append(loss)
    log(f"epoch {epoch}: {end - start:.2f}s, loss {loss:.4f}")
    if nan:
        break

eval_seconds, eval_metrics = None, {}
if ARGS["evaluate"]:
    start = time.time()
    result = trainer.evaluate(valid_data)
    eval_seconds = time.time() - start
    eval_metrics = {k: float(v) for k, v in result.items() if k.endswith("@20")}
    log(f"valid evaluation in {eval_seconds:.2f}s: {eval_metrics}")

print(RESULT_PREFIX + json.dumps({
    "epoch_seconds": epoch_seconds,
    "epoch_losses": epoch_losses,
    "loss_finite": all(math.isfinite(x) for x in epoch_losses),
    "build_seconds": build_seconds,
    "data_seconds": data_seconds,
    "eval_seconds": eval_seconds,
    "eval_metrics": eval_metrics,
    "num_batches": len(train_data),
    "num_users": dataset.get_user_num(),
    "num_items": dataset.get_item_num(),
    "num_train_interactions": len(train_ds),
    "torch_threads": torch.get_num_threads(),
    "torch_version": torch.__version__,
    "numpy_version": np.__version__,
    "pandas_version": __import__("pandas").__version__,
    "device": str(config["device"]),
    "compat_fixes": fixes,
    "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
}), flush=True)
"""


def reference_model_file(reference_dir: str | os.PathLike[str], model: str = "CM3") -> Path:
    """``src/models/<model>.py`` of a checkout, its name matched without regard to case."""
    folder = Path(reference_dir).expanduser() / "src" / "models"
    wanted = f"{model.lower()}.py"
    matches = sorted(f for f in folder.glob("*.py") if f.name.lower() == wanted)
    if not matches:
        raise FileNotFoundError(
            f"reference dir {str(Path(reference_dir).expanduser())!r} is not a checkout of an "
            f"MMRec-framework repository with model {model!r}: expected the folder that "
            f"contains src/, with {str(folder / wanted)!r} (any case) in it"
        )
    return matches[0]


def check_reference_dir(reference_dir: str | os.PathLike[str], model: str = "CM3") -> Path:
    """Return ``reference_dir`` as a resolved path, or raise if it lacks ``model``'s file."""
    reference_model_file(reference_dir, model)
    return Path(reference_dir).expanduser().resolve()


def _num_items(inter_file: Path) -> int:
    """Item count as the reference computes it: the largest ``itemID`` plus one."""
    with open(inter_file, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    col = header.index("itemID")
    items = np.loadtxt(inter_file, delimiter="\t", skiprows=1, usecols=col, dtype=np.int64)
    return int(items.max()) + 1


#: SEA's model loads a user-user graph (MMRec's ``preprocessing/dualgnn-gen-u-u-matrix.py``
#: output) at construction and resamples it every epoch without using it in training.
USER_GRAPH_FILE = "user_graph_dict.npy"
#: neighbours kept per user by that preprocessing
USER_GRAPH_TOP = 200


def user_graph_dict(inter_file: Path, top: int = USER_GRAPH_TOP) -> dict[int, list[list]]:
    """The user-user graph of MMRec's DualGNN preprocessing, computed as a sparse product:
    user ``u`` -> ``[neighbours, counts]``, the (at most ``top``) other users sharing the most
    distinct training items with ``u``, most shared first (ties in no fixed order)."""
    import torch

    with open(inter_file, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    cols = [header.index(c) for c in ("userID", "itemID", "x_label")]
    table = np.loadtxt(inter_file, delimiter="\t", skiprows=1, usecols=cols, dtype=np.int64)
    table = table.reshape(-1, 3)
    num_users = int(np.unique(table[:, 0]).size)
    train = np.unique(table[table[:, 2] == 0][:, :2], axis=0)  # distinct (user, item) pairs
    shape = (max(num_users, int(table[:, 0].max()) + 1), int(table[:, 1].max()) + 1)
    with warnings.catch_warnings():  # torch's notes on its sparse API, not about this data
        warnings.simplefilter("ignore", UserWarning)
        rated = torch.sparse_coo_tensor(
            torch.from_numpy(train.T.copy()), torch.ones(len(train)), shape
        ).coalesce()
        shared = torch.sparse.mm(rated, rated.t()).coalesce()
    (rows, cols), values = shared.indices().numpy(), shared.values().numpy()
    keep = rows != cols
    rows, cols, values = rows[keep], cols[keep], values[keep]
    bounds = np.searchsorted(rows, np.arange(num_users + 1))  # coalesced: rows sorted
    out: dict[int, list[list]] = {}
    for user in range(num_users):
        start, end = bounds[user], bounds[user + 1]
        neighbours, counts = cols[start:end], values[start:end]
        order = np.argsort(-counts, kind="stable")[:top]
        out[user] = [neighbours[order].tolist(), counts[order].astype(float).tolist()]
    return out


def _dataset_yaml(inter_file: str) -> str:
    return (
        "# written by cm3_pyg benchmarks/reference_cm3.py for this run\n"
        "USER_ID_FIELD: userID\n"
        "ITEM_ID_FIELD: itemID\n"
        "TIME_FIELD: timestamp\n"
        "filter_out_cod_start_users: True\n"
        f"inter_file_name: '{inter_file}'\n"
        "vision_feature_file: 'image_feat.npy'\n"
        "text_feature_file: 'text_feat.npy'\n"
        f"user_graph_dict_file: '{USER_GRAPH_FILE}'\n"
        'field_separator: "\\t"\n'
    )


def _prepare_data(scale: str, data_root: Path, dest: Path, feature_seed: int) -> tuple[str, str]:
    """Lay out the dataset for ``scale`` under ``dest``; return (dataset name, inter file)."""
    if scale == "tiktok":
        src = data_root / "tiktok"
        files = {
            "tiktok.inter": src / "tiktok.inter",
            "image_feat.npy": src / "image_feat.npy",
            "text_feat.npy": src / "audio_feat.npy",  # audio in the reference's text slot
        }
        for f in files.values():
            if not f.is_file():
                raise FileNotFoundError(f"TikTok data file {str(f)!r} not found (--data-root)")
        folder = dest / "tiktok"
        folder.mkdir(parents=True)
        for name, target in files.items():
            (folder / name).symlink_to(target.resolve())
        return "tiktok", "tiktok.inter"
    if scale == "baby":
        inter = data_root / "baby" / "baby.inter"
        if not inter.is_file():
            raise FileNotFoundError(f"Baby interaction file {str(inter)!r} not found (--data-root)")
        folder = dest / "baby_shaped"
        folder.mkdir(parents=True)
        (folder / "baby.inter").symlink_to(inter.resolve())
        # The very features our side of the benchmark loads (benchmarks.scales).
        features = generated_features(_num_items(inter), MMREC_FEATURE_DIMS, feature_seed)
        np.save(folder / "image_feat.npy", features["image"])
        np.save(folder / "text_feat.npy", features["text"])
        return "baby_shaped", "baby.inter"
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def _run_child(
    cmd: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path | None, timeout: float
) -> tuple[int, int | None]:
    """Run ``cmd``; return (exit code, that child's own peak RSS in KiB)."""
    with open(out, "w") as fout, open(err or os.devnull, "w") as ferr:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fout, stderr=ferr if err else None)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        try:
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, int(usage.ru_maxrss)
            import resource  # noqa: PLC0415 - Unix only; fallback: all children's peak

            code = proc.wait()
            return code, int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def reference_env(huge_pages: bool = False) -> dict[str, str]:
    """The environment a reference child runs in: this process's, without bytecode files,
    and with ``THP_MEM_ALLOC_ENABLE=1`` when ``huge_pages``; otherwise without that variable
    where ``cm3_pyg`` set it (the reference as shipped; a value the user exported stays)."""
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if huge_pages:
        env[_hugepages.TORCH_ENV] = "1"
    elif _hugepages.SET_BY_CM3:
        env.pop(_hugepages.TORCH_ENV, None)
    return env


def time_reference(
    reference_dir: str,
    scale: str,
    epochs: int = 2,
    threads: int | None = None,
    workdir: str | None = None,
    data_root: str = DEFAULT_DATA_ROOT,
    *,
    python: str | None = None,
    evaluate: bool = True,
    feature_seed: int = BABY_FEATURE_SEED,
    timeout: float | None = None,
    verbose: bool = False,
    model: str = "CM3",
    config: dict[str, Any] | None = None,
    model_args: dict[str, Any] | None = None,
    club: dict[str, Any] | None = None,
    huge_pages: bool = False,
) -> dict[str, Any]:
    """Time a reference model (a copy of ``reference_dir``) on ``scale`` in a subprocess.

    Args:
        reference_dir: a checkout of github.com/enoche/CM3, or of another MMRec-framework
            repository holding ``model`` (the folder containing ``src/``). It is copied,
            never modified.
        scale: ``"tiktok"`` (real TikTok) or ``"baby"`` (real Baby graph, generated features).
        epochs: training epochs to time, after the model is built.
        threads: ``torch.set_num_threads`` in the subprocess (default: torch's default).
        workdir: folder in which the per-run temporary folder is made and kept (default: a
            system temporary folder that is removed afterwards).
        data_root: the folder holding ``tiktok/`` and ``baby/`` (read only; never written).
        python: interpreter that runs the reference (default: this one); needs pandas.
        evaluate: also time one full-ranking evaluation on the validation split.
        feature_seed: seed of the generated ``baby`` features.
        timeout: seconds after which the subprocess is killed (default: none).
        verbose: let the subprocess's progress log through to this process's stderr.
        model: the reference's model class name (``src/models/<model>.py``, any case).
        config: the run's configuration over the reference's YAMLs (default: CM3's
            :data:`REFERENCE_CONFIG`); it must give one value for every grid key of the
            model's YAML. ``seed`` and ``hyper_parameters`` default to 999 and ``[seed]``.
        model_args: for a model whose constructor takes a third ``args`` (SEA: its
            command-line options), those options.
        club: for a trainer that takes a CLUB network (SEA), its ``CLUBSample`` sizes.
        huge_pages: run the reference with ``THP_MEM_ALLOC_ENABLE=1`` (huge-page-aligned
            large CPU tensors, what importing ``cm3_pyg`` sets for our side). By default it
            runs as shipped: the variable is removed from its environment when ``cm3_pyg``
            set it in this process (a value the user exported stays).

    Returns:
        A JSON-able dict: ``scale``, ``epoch_seconds``, ``median_epoch_seconds``,
        ``epoch_losses``, ``build_seconds``, ``eval_seconds``, ``peak_rss_mib``,
        ``num_batches``, ``torch_threads`` and further details of the run.

    Raises:
        FileNotFoundError: ``reference_dir`` is no CM3 checkout, or the data is missing.
        RuntimeError: the reference failed; the message carries the end of its output.
    """
    ref = check_reference_dir(reference_dir, model)
    model_file = reference_model_file(ref, model)
    run_config = dict(REFERENCE_CONFIG if config is None else config)
    run_config.setdefault("seed", 999)
    run_config.setdefault("hyper_parameters", ["seed"])
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    root = Path(data_root).expanduser().resolve()
    if workdir is not None:
        base = Path(workdir).expanduser().resolve()
        if base == root or root in base.parents:
            raise ValueError(f"workdir {str(base)!r} must not be inside data_root {str(root)!r}")
        base.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"cm3_reference_{scale}_", dir=base))
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix=f"cm3_reference_{scale}_")
        run_dir = Path(cleanup.name)
    try:
        shutil.copytree(ref, run_dir / "reference", ignore=shutil.ignore_patterns(*_COPY_IGNORE))
        src = run_dir / "reference" / "src"
        own_name = src / "models" / f"{model.lower()}.py"
        if not own_name.exists():  # compat: the framework imports models.<name.lower()>
            shutil.copyfile(src / "models" / model_file.name, own_name)
        data_dir = run_dir / "data"
        dataset, inter_file = _prepare_data(scale, root, data_dir, feature_seed)
        (src / "configs" / "dataset" / f"{dataset}.yaml").write_text(_dataset_yaml(inter_file))
        if "user_graph_dict_file" in model_file.read_text(encoding="utf-8", errors="replace"):
            graph = user_graph_dict(data_dir / dataset / inter_file)
            np.save(data_dir / dataset / USER_GRAPH_FILE, graph, allow_pickle=True)
        driver = run_dir / "driver.py"
        driver.write_text(_DRIVER)
        child_config = dict(run_config)
        child_config.update(
            {
                "use_gpu": False,
                "gpu_id": 0,
                "data_path": str(data_dir) + os.sep,
                "epochs": epochs,
                "inter_file_name": inter_file,
            }
        )
        args = {
            "model": model,
            "dataset": dataset,
            "config": child_config,
            "model_args": model_args,
            "club": club,
            "epochs": epochs,
            "threads": threads,
            "evaluate": evaluate,
            "result_prefix": _RESULT_PREFIX,
            "error_prefix": _ERROR_PREFIX,
        }
        env = reference_env(huge_pages)
        out, err = run_dir / "stdout.txt", None if verbose else run_dir / "stderr.txt"
        cmd = [python or sys.executable, str(driver), json.dumps(args)]
        code, maxrss_kib = _run_child(cmd, src, env, out, err, timeout or 0)
        stdout = out.read_text(errors="replace")
        lines = stdout.splitlines()
        errors = [ln[len(_ERROR_PREFIX) :] for ln in lines if ln.startswith(_ERROR_PREFIX)]
        if errors:
            raise RuntimeError(f"reference run failed: {json.loads(errors[-1])['error']}")
        results = [ln[len(_RESULT_PREFIX) :] for ln in lines if ln.startswith(_RESULT_PREFIX)]
        if code != 0 or not results:
            where = "" if err is None else f"\n--- stderr (tail) ---\n{_tail(err)}"
            raise RuntimeError(
                f"reference run exited with code {code} and no result (run folder {run_dir})"
                f"\n--- stdout (tail) ---\n{stdout[-2000:]}{where}"
            )
        child = json.loads(results[-1])
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    return {
        "model": model,
        "scale": scale,
        "dataset": dataset,
        "epoch_seconds": child["epoch_seconds"],
        "median_epoch_seconds": statistics.median(child["epoch_seconds"]),
        "epoch_losses": child["epoch_losses"],
        "loss_finite": child["loss_finite"],
        "build_seconds": child["build_seconds"],
        "eval_seconds": child["eval_seconds"],
        "eval_metrics": child["eval_metrics"],
        "data_seconds": child["data_seconds"],
        "peak_rss_mib": None if maxrss_kib is None else round(maxrss_kib / 1024, 1),
        "num_batches": child["num_batches"],
        "num_users": child["num_users"],
        "num_items": child["num_items"],
        "num_train_interactions": child["num_train_interactions"],
        "torch_threads": child["torch_threads"],
        "torch_version": child["torch_version"],
        "numpy_version": child["numpy_version"],
        "pandas_version": child["pandas_version"],
        "device": child["device"],
        "config": run_config,
        "feature_seed": feature_seed if scale == "baby" else None,
        "compat_fixes": child["compat_fixes"],
        "reference_dir": str(ref),
        "reference_model_file": model_file.name,
        "reference_model_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
        "run_dir": None if cleanup is not None else str(run_dir),
    }


def _cli_config(model: str, pairs: Sequence[str]) -> dict[str, Any] | None:
    from cm3_pyg.errors import ConfigError
    from cm3_pyg.training.config import parse_overrides

    try:
        values = parse_overrides(pairs)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    if model.lower() == "cm3":
        return {**REFERENCE_CONFIG, **values}
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print :func:`time_reference`'s result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference-dir", required=True, help="checkout of enoche/CM3 (containing src/)"
    )
    parser.add_argument("--model", default="CM3", help="the reference's model class name")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config value (YAML) over CM3's REFERENCE_CONFIG, or for another --model over "
        "its YAMLs (repeatable)",
    )
    parser.add_argument("--scale", choices=SCALES, default="tiktok")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="keep the run folder under this folder")
    parser.add_argument("--python", default=None, help="interpreter for the reference (pandas)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation timing")
    parser.add_argument("--feature-seed", type=int, default=BABY_FEATURE_SEED)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--verbose", action="store_true", help="show the reference's progress")
    args = parser.parse_args(argv)
    result = time_reference(
        args.reference_dir,
        args.scale,
        epochs=args.epochs,
        threads=args.threads,
        workdir=args.workdir,
        data_root=args.data_root,
        python=args.python,
        evaluate=not args.no_eval,
        feature_seed=args.feature_seed,
        timeout=args.timeout,
        verbose=args.verbose,
        model=args.model,
        config=_cli_config(args.model, args.set),
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
