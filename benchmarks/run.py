"""The performance suite: one entry point, side-by-side measurements, JSON + markdown.

    python -m benchmarks.run --suite cpu --data-root ../shared/data \
        --reference-dir /path/to/enoche-CM3-checkout --baseline-rev de592ad
    python -m benchmarks.run --suite quick            # seconds; synthetic data only

Sections (``--sections``, default all):

* ``kernels``: sparse propagation kernels, forward + backward, on the real graphs
  (torch.sparse.mm on CSR with autograd, PyG ``spmm``, PyG ``EdgeIndex``, torch-sparse
  ``SparseTensor`` when installed, and this library's CSR kernel with a prebuilt transpose),
  plus the backend that ``sparse_backend: auto`` picks by measurement.
* ``bandwidth``: the device's copy bandwidth and the achieved bandwidth of the CSR product of
  propagation on the same graphs at width 192 (CM3's node table), under two byte counts
  (every entry's row read from memory; each row read once).
* ``knn``: the modality kNN graph, block-wise against a dense ``I x I`` reference where the
  dense one fits in memory (seconds, peak extra RSS).
* ``train``: CM3 with its default configuration at every scale of the suite (TikTok; real
  baby/sports/clothing graphs with generated 4096 + 384-d features; the Amazon-Elec-scale
  synthetic graph): graph build, seconds per optimizer step and per epoch, peak RSS, one
  full-ranking evaluation (users per second, peak extra RSS), and for the 4096-d scales the
  FLOP floor of the feature encoders at this machine's measured matmul rate. Every scale
  runs in its own subprocess so that its peak RSS is its own.
  With ``--baseline-rev REV`` the TikTok and baby runs are repeated with ``cm3_pyg`` as of
  that git revision of this repository (before/after, same sitting).
* ``reference``: the reference implementation (github.com/enoche/CM3), from a checkout the
  user provides (never part of this repository), timed on TikTok and baby-shaped data in
  the same sitting (see :mod:`benchmarks.reference_cm3`), beside ours.

Results go to ``benchmarks/results/<suite>.json`` and ``<suite>.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("kernels", "bandwidth", "knn", "train", "reference")
#: Scales per suite, and those timed over a full epoch (the others: steps x batches).
SUITES: dict[str, dict[str, Any]] = {
    "quick": {"scales": ["synthetic"], "full_epoch": {"synthetic"}, "steps": 5},
    "cpu": {
        "scales": ["tiktok", "baby", "sports", "clothing", "elec"],
        "full_epoch": {"tiktok", "baby", "elec"},
        "steps": 10,
    },
    "gpu": {
        "scales": ["tiktok", "baby", "sports", "clothing", "elec"],
        "full_epoch": {"tiktok", "baby", "sports", "clothing", "elec"},
        "steps": 20,
    },
}
CHILD_MARK = "BENCH_JSON "
#: Scales whose steps are profiled (where a step's time goes, before and after).
PROFILED = ("tiktok", "baby", "elec", "synthetic")


# --------------------------------------------------------------------------- memory
def _status_mib(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB (``None`` where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Current resident set size (MiB), from /proc (0 where unavailable)."""
    current = _status_mib("VmRSS")
    return 0.0 if current is None else current


#: Highest VmHWM seen before any reset, so that :func:`process_peak_rss_mib` stays the
#: peak of the whole process while :func:`measure_peak` resets the counter per phase.
_FOLDED_PEAK_MIB = 0.0


def process_peak_rss_mib() -> float:
    """Peak RSS of this process since it started (exec), MiB.

    ``getrusage``'s ``ru_maxrss`` is not used: Linux carries it over ``execve``, so a
    child would report its parent's peak when that was higher.
    """
    return max(_FOLDED_PEAK_MIB, peak_rss_mib())


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5)."""
    global _FOLDED_PEAK_MIB
    _FOLDED_PEAK_MIB = max(_FOLDED_PEAK_MIB, peak_rss_mib())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (else since start), MiB."""
    peak = _status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, seconds, peak extra RSS MiB)`` of ``fn()`` in this process."""
    base = rss_mib()
    reset_peak_rss()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, seconds, max(peak_rss_mib() - base, 0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, m: int = 7050, k: int = 4096, n: int = 256) -> float:
    """Measured float32 GEMM rate (GFLOP/s) on the encoder's shape ``[m, k] @ [k, n]``."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best / 1e9


def encoder_flops(num_items: int, feature_dims: Sequence[int], d: int = 64) -> float:
    """FLOPs of CM3's feature encoders and projections in one optimizer step.

    Per modality of width ``f``: ``Linear(f, 4d)`` forward and its weight gradient
    (``2 x 2 I f 4d``; the raw features need no gradient), ``Linear(4d, d)`` forward, input
    and weight gradients (``3 x 2 I 4d d``), and the projection ``Linear(f, d)`` forward
    and weight gradient (``2 x 2 I f d``).
    """
    total = 0.0
    for f in feature_dims:
        total += 2 * 2 * num_items * f * 4 * d
        total += 3 * 2 * num_items * 4 * d * d
        total += 2 * 2 * num_items * f * d
    return total


# --------------------------------------------------------------------------- data
def load_scale(scale: str, data_root: str | None, cache_dir: str | None) -> Any:
    """The HeteroData of a suite scale."""
    if scale == "synthetic":
        from cm3_pyg.data import make_synthetic

        return make_synthetic()
    if scale == "elec":
        from benchmarks.scales import elec_scale

        return elec_scale()
    if data_root is None:
        raise SystemExit(f"scale {scale!r} needs --data-root or $CM3_DATA_ROOT")
    if scale == "tiktok":
        try:
            from cm3_pyg.data.loading import load_dataset
        except ImportError:  # a --baseline-rev older than cm3_pyg.data.loading
            from cm3_pyg.cli import load_data as load_dataset

        return load_dataset(data_root, "tiktok", cache_dir=cache_dir)[0]
    from benchmarks.scales import amazon_with_generated_features

    return amazon_with_generated_features(data_root, scale, cache_dir=cache_dir)


# --------------------------------------------------------------------------- train (child)
def train_child(
    scale: str,
    data_root: str | None,
    cache_dir: str | None,
    device: str,
    steps: int,
    full_epoch: bool,
    profile_steps: int = 0,
    epochs_timed: int = 1,
) -> dict[str, Any]:
    """Build, train and evaluate CM3 at one scale; runs in its own process."""
    import inspect

    from cm3_pyg.models import CM3
    from cm3_pyg.training import load_config
    from cm3_pyg.training.inputs import build_graph_inputs, get_splits
    from cm3_pyg.training.trainer import Trainer, seed_everything

    dev = torch.device(device)
    out: dict[str, Any] = {"scale": scale, "device": device, "threads": torch.get_num_threads()}
    try:  # what the training CLIs do (older revisions lack it)
        from cm3_pyg.training.memory import retain_freed_memory
    except ImportError:
        out["retain_freed_memory"] = False
    else:
        out["retain_freed_memory"] = retain_freed_memory()
    data, out["load_seconds"], _ = measure_peak(lambda: load_scale(scale, data_root, cache_dir))
    config = load_config(CM3.default_config(), None, {"device": device})
    seed_everything(int(config["seed"]))
    inputs, out["graph_build_seconds"], out["graph_build_peak_extra_mib"] = measure_peak(
        lambda: build_graph_inputs(data, config, uses_item_graph=True)
    )
    splits = get_splits(data)
    out.update(
        users=inputs.num_users,
        items=inputs.num_items,
        train_rows=int(splits.train.size(1)),
        feature_dims=[int(x.size(1)) for x in inputs.features],
        ui_nnz=_nnz(inputs.ui_adj),
        sparse_backend=getattr(inputs.ui_adj, "backend", type(inputs.ui_adj).__name__),
    )
    model = CM3.from_config(config, inputs)
    trainer = Trainer(model, inputs, splits, config, progress=False)
    batches = -(-out["train_rows"] // int(config["train_batch_size"]))
    out["batches_per_epoch"] = batches
    partial = "max_batches" in inspect.signature(trainer.train_epoch).parameters
    if partial:
        trainer.train_epoch(1, max_batches=2)  # warm-up
        _sync(dev)
        start = time.perf_counter()
        trainer.train_epoch(1, max_batches=steps)
        _sync(dev)
        out["seconds_per_step"] = (time.perf_counter() - start) / steps
        out["steps_timed"] = steps
    if full_epoch or not partial:
        # The median of several epochs: one epoch on a shared VM swings by 20-30%.
        timed = max(1, epochs_timed) if full_epoch else 1
        seconds = []
        for epoch in range(timed):
            start = time.perf_counter()
            trainer.train_epoch(2 + epoch)
            _sync(dev)
            seconds.append(time.perf_counter() - start)
        out["epoch_seconds"] = seconds
        out["seconds_per_epoch"] = statistics.median(seconds)
        out["epoch_measured"] = True
        if not partial:
            out["seconds_per_step"] = out["seconds_per_epoch"] / batches
    else:
        out["seconds_per_epoch"] = out["seconds_per_step"] * batches
        out["epoch_measured"] = False
    if profile_steps:
        out["profile"] = profile_training(trainer, profile_steps, partial)
    valid_users = int(torch.unique(splits.valid[0]).numel())
    _, out["eval_seconds"], out["eval_peak_extra_mib"] = measure_peak(
        lambda: trainer.evaluate("valid")
    )
    out["eval_users"] = valid_users
    out["eval_users_per_second"] = valid_users / out["eval_seconds"]
    out["peak_rss_mib"] = process_peak_rss_mib()
    if dev.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if max(out["feature_dims"], default=0) >= 1024:
        flops = encoder_flops(inputs.num_items, out["feature_dims"])
        rate = matmul_gflops(dev)
        out["encoder_gflop_per_step"] = flops / 1e9
        out["matmul_gflops"] = rate
        out["encoder_floor_seconds_per_step"] = flops / 1e9 / rate
        out["encoder_floor_seconds_per_epoch"] = flops / 1e9 / rate * batches
    return out


def profile_training(trainer: Any, steps: int, partial: bool, top: int = 12) -> dict[str, Any]:
    """Where the time of ``steps`` optimizer steps goes: torch.profiler's top operators.

    Operators are grouped by name (self time, ms per step, share of the profiled total).
    Without ``max_batches`` (older code) a whole epoch is profiled and divided by its steps.
    """
    from torch.profiler import ProfilerActivity, profile

    batches = steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        if partial:
            trainer.train_epoch(3, max_batches=steps)
        else:
            batches = -(-trainer.splits.train.size(1) // int(trainer.config["train_batch_size"]))
            trainer.train_epoch(3)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "steps": batches,
        "total_ms_per_step": total / 1e3 / batches,
        "top": [
            {
                "op": e.key,
                "ms_per_step": e.self_cpu_time_total / 1e3 / batches,
                "share": e.self_cpu_time_total / total,
                "calls_per_step": e.count / batches,
            }
            for e in ranked
        ],
    }


def _nnz(adj: Any) -> int:
    if hasattr(adj, "nnz"):
        return int(adj.nnz if isinstance(adj.nnz, int) else adj.nnz())
    if isinstance(adj, torch.Tensor):
        return int(adj._nnz())
    return -1


def run_child(args: list[str], baseline_src: Path | None = None) -> dict[str, Any]:
    """Run ``python -m benchmarks.run --child ...`` and parse its JSON line."""
    env = dict(os.environ)
    cwd = ROOT
    if baseline_src is not None:
        # The old cm3_pyg first on the path; this repository only supplies `benchmarks`.
        env["PYTHONPATH"] = os.pathsep.join([str(baseline_src), str(ROOT)])
        cwd = baseline_src
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--child", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK) :])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"error": f"child {' '.join(args)} failed (exit {proc.returncode}): {tail}"}


def child_options(
    device: str, steps: int, data_root: str | None, cache_dir: str | None
) -> list[str]:
    """The options every train child gets; folders as absolute paths, since a baseline
    child runs in its own checkout's folder, where a relative path means another place."""
    options = ["--device", device, "--steps", str(steps)]
    for flag, folder in (("--data-root", data_root), ("--cache-dir", cache_dir)):
        if folder:
            options += [flag, os.path.abspath(folder)]
    return options


def baseline_checkout(rev: str, into: Path) -> Path:
    """``cm3_pyg/`` of git revision ``rev`` of this repository, extracted under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "cm3_pyg"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


# --------------------------------------------------------------------------- kernels
def _kernel_candidates(index: torch.Tensor, weight: torch.Tensor, n: int) -> dict[str, Any]:
    import warnings

    from torch_geometric.utils import spmm as pyg_spmm

    from cm3_pyg.nn.sparse import available_backends, to_adjacency

    coo = torch.sparse_coo_tensor(index, weight, (n, n)).coalesce()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = coo.to_sparse_csr()
    kernels: dict[str, Any] = {
        "torch.sparse.mm (CSR, autograd)": lambda x: torch.sparse.mm(csr, x),
        "PyG spmm (CSR)": lambda x: pyg_spmm(csr, x),
    }
    for backend, label in (
        ("edge_index", "PyG EdgeIndex.matmul"),
        ("torch_sparse", "torch-sparse SparseTensor"),
        ("csr", "cm3_pyg csr (prebuilt transpose)"),
    ):
        if backend in available_backends():
            adj = to_adjacency(index, weight, n, backend=backend)
            kernels[label] = adj.matmul
    return kernels


def kernels_section(graphs: dict[str, tuple[torch.Tensor, torch.Tensor, int]], device: str):
    from cm3_pyg.nn.sparse import choose_backend, time_forward_backward, to_adjacency

    rows = []
    for name, (index, weight, n) in graphs.items():
        for width in (64, 192):
            x = torch.randn(n, width, device=device, requires_grad=True)
            kernels = _kernel_candidates(index.to(device), weight.to(device), n)
            times = {
                label: statistics.median(time_forward_backward(fn, x, repeats=5))
                for label, fn in kernels.items()
            }
            base = times["torch.sparse.mm (CSR, autograd)"]
            adj = to_adjacency(index.to(device), weight.to(device), n, backend="csr")
            rows.append(
                {
                    "graph": name,
                    "nodes": n,
                    "nnz": adj.nnz,
                    "width": width,
                    "ms": {k: v * 1e3 for k, v in times.items()},
                    "ratio_vs_torch_sparse_mm": {k: v / base for k, v in times.items()},
                    "auto_choice": choose_backend(adj, width),
                }
            )
    return rows


# --------------------------------------------------------------------------- bandwidth
def copy_bandwidth(device: str, mib: int = 512, repeats: int = 7) -> float:
    """The device's copy bandwidth in bytes/s: ``dst.copy_(src)`` of ``mib`` MiB (each byte
    read once and written once), median of ``repeats`` after a warm-up copy."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 4 / _median_seconds(lambda: dst.copy_(src), device, repeats)


def _median_seconds(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = _clock(device)
        fn()
        times.append(_clock(device) - start)
    return statistics.median(times)


def _clock(device: str) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def product_bytes(num_rows: int, num_cols: int, nnz: int, width: int, index_bytes: int) -> dict:
    """Bytes one CSR product ``A @ x`` (``A`` ``[num_rows, num_cols]``, float32 values,
    ``x`` ``[num_cols, width]`` float32) must move under two models: ``gathered``, every
    stored entry reads its row of ``x`` from memory (no cache reuse); ``compulsory``, ``x``
    is read once. Both read the matrix (row pointers, column indices, values) and write the
    output once."""
    matrix = (num_rows + 1) * index_bytes + nnz * (index_bytes + 4)
    out = num_rows * width * 4
    return {
        "gathered": matrix + nnz * width * 4 + out,
        "compulsory": matrix + num_cols * width * 4 + out,
    }


def bandwidth_section(
    graphs: dict[str, tuple[torch.Tensor, torch.Tensor, int]],
    device: str,
    width: int = 192,
    repeats: int = 7,
) -> dict[str, Any]:
    """Achieved bandwidth of the propagation's CSR product (forward, the library's ``csr``
    backend) on each graph at CM3's node-table width, against the device's copy bandwidth
    measured in the same run."""
    from cm3_pyg.nn.sparse import to_adjacency

    copy = copy_bandwidth(device)
    rows = []
    for name, (index, weight, n) in graphs.items():
        adj = to_adjacency(index.to(device), weight.to(device), n, backend="csr")
        matrix = adj._csr_pair[0] if adj._csr_pair is not None else None
        index_bytes = matrix.col_indices().element_size() if matrix is not None else 8
        x = torch.randn(n, width, device=device)
        with torch.no_grad():
            seconds = _median_seconds(lambda adj=adj, x=x: adj.matmul(x), device, repeats)
        moved = product_bytes(n, n, adj.nnz, width, index_bytes)
        rows.append(
            {
                "graph": name,
                "nodes": n,
                "nnz": adj.nnz,
                "width": width,
                "ms": seconds * 1e3,
                "gbps": {k: v / seconds / 1e9 for k, v in moved.items()},
                "of_copy": {k: v / seconds / copy for k, v in moved.items()},
            }
        )
    return {"copy_gbps": copy / 1e9, "rows": rows}


def kernel_graphs(data_root: str | None, cache_dir: str | None, suite: str):
    from cm3_pyg.data import bipartite_normalized_adjacency
    from cm3_pyg.data.graphs import cosine_topk, knn_normalized_adjacency

    graphs: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    names = ["synthetic"] if suite == "quick" else ["tiktok", "baby", "elec"]
    for name in names:
        if name == "elec":
            from benchmarks.scales import elec_scale

            data = elec_scale(image_dim=1, text_dim=1)
        else:
            data = load_scale(name, data_root, cache_dir)
        store = data["user", "rates", "item"]
        nu, ni = int(data["user"].num_nodes), int(data["item"].num_nodes)
        index, weight = bipartite_normalized_adjacency(store.edge_index, nu, ni)
        graphs[f"{name} user-item"] = (index, weight, nu + ni)
        if name in ("tiktok", "synthetic"):
            m = data.modalities[0]
            _, knn = cosine_topk(data["item"][f"x_{m}"].float(), 10)
            knn_index, knn_weight = knn_normalized_adjacency(knn, ni)
            graphs[f"{name} item kNN"] = (knn_index, knn_weight, ni)
    return graphs


# --------------------------------------------------------------------------- knn
def knn_section(
    data_root: str | None, cache_dir: str | None, suite: str, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Block-wise vs dense kNN build per feature matrix (peak extra RSS: host memory)."""
    from benchmarks.scales import generated_features
    from cm3_pyg.data.graphs import cosine_topk

    cases: dict[str, torch.Tensor] = {}
    if suite == "quick":
        from cm3_pyg.data import make_synthetic

        data = make_synthetic()
        cases["synthetic image"] = data["item"][f"x_{data.modalities[0]}"].float()
    else:
        data = load_scale("tiktok", data_root, cache_dir)
        cases["tiktok image 6710x128"] = data["item"]["x_image"].float()
        feats = generated_features(7050, {"image": 4096}, seed=0)
        cases["baby-shaped image 7050x4096"] = torch.from_numpy(feats["image"])
        feats = generated_features(23033, {"image": 4096}, seed=0)
        cases["clothing-shaped image 23033x4096"] = torch.from_numpy(feats["image"])
    rows = []
    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name, x in cases.items():
        x = x.to(device)
        n = x.size(0)
        (_, block_idx), block_s, block_mib = measure_peak(lambda x=x: cosine_topk(x, 10))
        row: dict[str, Any] = {
            "case": name,
            "block_seconds": block_s,
            "block_peak_extra_mib": block_mib,
        }
        dense_bytes = 3 * n * n * 4  # similarity, topk workspace, normalised copy margin
        if dense_bytes < total_ram / 3:

            def dense(x: torch.Tensor = x) -> torch.Tensor:
                xn = x / x.norm(dim=-1, keepdim=True)
                return torch.topk(xn @ xn.t(), 10, dim=-1).indices

            dense_idx, row["dense_seconds"], row["dense_peak_extra_mib"] = measure_peak(dense)
            # Same neighbour sets (ties aside): the sorted index lists agree on most rows.
            same = (dense_idx.sort(-1).values == block_idx.sort(-1).values).all(-1)
            row["same_neighbours_fraction"] = float(same.float().mean())
        else:
            row["dense_skipped"] = f"needs ~{dense_bytes / 2**30:.1f} GiB"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from cm3_pyg.typing import WITH_TORCH_SPARSE

    info["torch_sparse"] = WITH_TORCH_SPARSE
    return info


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Benchmark suite `{result['suite']}`", ""]
    m = result["machine"]
    lines += [
        f"Machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {m['ram_gib']} GiB RAM, "
        f"torch {m['torch']} ({m['threads']} threads), torch-sparse installed: "
        f"{m['torch_sparse']}. Device: {result['device']}. Run {result['date']}, "
        f"{result['total_seconds']:.0f} s in all.",
        "",
    ]
    if "kernels" in result:
        labels: list[str] = []
        for row in result["kernels"]:
            labels += [k for k in row["ms"] if k not in labels]
        lines += [
            "## Propagation kernels (forward + backward, median ms; ratio to torch.sparse.mm)",
            "",
            "| graph | nnz | width | " + " | ".join(labels) + " | auto picks |",
            "|---|---|---|" + "---|" * len(labels) + "---|",
        ]
        for row in result["kernels"]:
            cells = [
                f"{row['ms'][k]:.2f} ({row['ratio_vs_torch_sparse_mm'][k]:.2f}x)"
                if k in row["ms"]
                else "-"
                for k in labels
            ]
            lines.append(
                f"| {row['graph']} | {row['nnz']} | {row['width']} | "
                + " | ".join(cells)
                + f" | {row['auto_choice']} |"
            )
        lines.append("")
    if "bandwidth" in result:
        band = result["bandwidth"]
        lines += [
            "## Propagation bandwidth (CSR product, forward, median)",
            "",
            f"Copy bandwidth of this device: {band['copy_gbps']:.1f} GB/s (read + write).",
            "",
            "| graph | nnz | width | ms | GB/s, rows gathered | of copy | GB/s, rows read once "
            "| of copy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in band["rows"]:
            lines.append(
                f"| {r['graph']} | {r['nnz']} | {r['width']} | {r['ms']:.2f} | "
                f"{r['gbps']['gathered']:.1f} | {r['of_copy']['gathered']:.2f} | "
                f"{r['gbps']['compulsory']:.1f} | {r['of_copy']['compulsory']:.2f} |"
            )
        lines.append("")
    if "knn" in result:
        lines += [
            "## Modality kNN graph (k = 10): block-wise vs dense I x I",
            "",
            "| features | block-wise s | block-wise peak extra MiB | dense s | dense peak "
            "extra MiB | same neighbours |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["knn"]:
            dense_s = _f(r.get("dense_seconds"), 2) if "dense_seconds" in r else r["dense_skipped"]
            lines.append(
                f"| {r['case']} | {r['block_seconds']:.2f} | {r['block_peak_extra_mib']:.0f} | "
                f"{dense_s} | {_f(r.get('dense_peak_extra_mib'), 0)} | "
                f"{_f(r.get('same_neighbours_fraction'), 4)} |"
            )
        lines.append("")
    if "train" in result:
        lines += [
            "## CM3 training (default config) and full-ranking evaluation",
            "",
            "| scale | code | users | items | train rows | graph build s | s/step | s/epoch | "
            "peak RSS MiB | eval s | eval users/s | eval peak extra MiB | encoder floor s/epoch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["train"]:
            if "error" in r:
                lines.append(
                    f"| {r.get('scale', '?')} | {r.get('code', '')} | error: {r['error'][:200]} |"
                )
                continue
            epoch = f"{r['seconds_per_epoch']:.2f}" + ("" if r["epoch_measured"] else " (est.)")
            lines.append(
                f"| {r['scale']} | {r['code']} | {r['users']} | {r['items']} | {r['train_rows']} | "
                f"{r['graph_build_seconds']:.1f} | {r['seconds_per_step']:.3f} | {epoch} | "
                f"{r['peak_rss_mib']:.0f} | {r['eval_seconds']:.2f} | "
                f"{r['eval_users_per_second']:.0f} | {r['eval_peak_extra_mib']:.0f} | "
                f"{_f(r.get('encoder_floor_seconds_per_epoch'), 2)} |"
            )
        lines.append("")
    profiled = [r for r in result.get("train", []) if r.get("profile")]
    if profiled:
        lines += ["## Where a training step goes (torch.profiler, self time per step)", ""]
        for r in profiled:
            prof = r["profile"]
            lines += [
                f"**{r['scale']}, {r['code']}**: {prof['total_ms_per_step']:.1f} ms of operator "
                f"time per step ({prof['steps']} steps profiled).",
                "",
                "| operator | ms/step | share | calls/step |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| `{e['op']}` | {e['ms_per_step']:.2f} | {100 * e['share']:.1f}% | "
                f"{e['calls_per_step']:.1f} |"
                for e in prof["top"]
            ]
            lines.append("")
    if "reference" in result:
        lines += [
            "## Against the reference implementation (same machine, same sitting)",
            "",
            "Each side: the median of its timed epochs (all of them in brackets).",
            "",
            "| scale | reference s/epoch | cm3_pyg s/epoch | ratio | encoder floor s/epoch |",
            "|---|---|---|---|---|",
        ]

        def timed(value: Any, epochs: Any) -> str:
            if not epochs:
                return _f(value, 2)
            return f"{_f(value, 2)} ({', '.join(_f(e, 2) for e in epochs)})"

        for r in result["reference"]:
            ref_epochs = r.get("reference", {}).get("epoch_seconds")
            lines.append(
                f"| {r['scale']} | {timed(r.get('reference_seconds_per_epoch'), ref_epochs)} | "
                f"{timed(r.get('ours_seconds_per_epoch'), r.get('ours_epoch_seconds'))} | "
                f"{_f(r.get('ratio'), 3)} | {_f(r.get('encoder_floor_seconds_per_epoch'), 2)} |"
            )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def merge_results(previous: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """``result`` over an earlier ``<suite>.json``: sections it did not measure are kept.

    ``train`` and ``reference`` are merged per scale: a scale measured now replaces every
    earlier row of that scale (this revision's, a baseline's, an older revision's), so that
    the rows of one scale always come from one sitting and a before/after never pairs
    figures from different sittings. Other scales' rows are kept.
    """
    both = {k: v for k, v in previous.items() if k in SECTIONS}
    for key in SECTIONS:
        if key not in result:
            continue
        if key in ("train", "reference") and key in both:
            fresh = {row.get("scale") for row in result[key]}
            both[key] = [r for r in both[key] if r.get("scale") not in fresh] + result[key]
        else:
            both[key] = result[key]
    return {**result, **both}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {SECTIONS}")
    p.add_argument("--scales", default=None, help="subset of the suite's scales (comma list)")
    p.add_argument("--data-root", default=os.environ.get("CM3_DATA_ROOT"))
    p.add_argument("--cache-dir", default=None, help="processed-data cache (data read-only)")
    p.add_argument("--device", default=None, help="cpu (default for cpu/quick) or cuda")
    p.add_argument("--reference-dir", default=None, help="checkout of github.com/enoche/CM3")
    p.add_argument("--reference-epochs", type=int, default=2)
    p.add_argument(
        "--reference-python",
        default=None,
        help="interpreter for the reference (it needs pandas; default: this one)",
    )
    p.add_argument(
        "--fresh", action="store_true", help="start a new <suite>.json instead of merging into it"
    )
    p.add_argument("--baseline-rev", default=None, help="git revision for before/after runs")
    p.add_argument("--out", default=str(RESULTS), help="folder for <suite>.json and .md")
    p.add_argument(
        "--steps-only",
        action="store_true",
        help="time --steps steps and estimate epochs (no full epochs; e.g. a quick Elec check)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scale", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--steps", type=int, default=None, help="timed steps per scale (default: the suite's)"
    )
    p.add_argument("--full-epoch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--epochs-timed",
        type=int,
        default=3,
        help="full epochs timed per TikTok/baby-sized scale; the median is reported (Elec: 1)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        default=5,
        help="profile this many TikTok/baby steps (torch.profiler) in the train section; 0: off",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suite = SUITES[args.suite]
    device = args.device or ("cuda" if args.suite == "gpu" else "cpu")
    steps = args.steps or suite["steps"]
    if args.child == "train":
        res = train_child(
            args.scale,
            args.data_root,
            args.cache_dir,
            device,
            steps,
            args.full_epoch,
            args.profile_steps,
            args.epochs_timed,
        )
        print(CHILD_MARK + json.dumps(res), flush=True)
        return 0
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; expected some of {SECTIONS}")
    scales = args.scales.split(",") if args.scales else suite["scales"]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "suite": args.suite,
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
    }
    out = Path(args.out)

    previous: dict[str, Any] = {}
    target = out / f"{args.suite}.json"
    if target.is_file() and not args.fresh:
        # Sections and rows measured by an earlier invocation are kept unless re-measured.
        previous = json.loads(target.read_text())

    def save() -> None:
        from cm3_pyg.io import atomic_write_text

        result["total_seconds"] = time.perf_counter() - started
        full = merge_results(previous, result)
        atomic_write_text(target, json.dumps(full, indent=2) + "\n")
        atomic_write_text(out / f"{args.suite}.md", to_markdown(full) + "\n")

    common = child_options(device, steps, args.data_root, args.cache_dir)
    if "kernels" in sections or "bandwidth" in sections:
        graphs = kernel_graphs(args.data_root, args.cache_dir, args.suite)
        if "kernels" in sections:
            print("kernels ...", flush=True)
            result["kernels"] = kernels_section(graphs, device)
            save()
        if "bandwidth" in sections:
            print("bandwidth ...", flush=True)
            result["bandwidth"] = bandwidth_section(graphs, device)
            save()
    if "knn" in sections:
        print("knn ...", flush=True)
        result["knn"] = knn_section(args.data_root, args.cache_dir, args.suite, device)
        save()
    ours: dict[str, dict[str, Any]] = {}
    if "train" in sections:
        result["train"] = []
        with tempfile.TemporaryDirectory() as tmp:
            baseline = (
                baseline_checkout(args.baseline_rev, Path(tmp)) if args.baseline_rev else None
            )
            for scale in scales:
                print(f"train {scale} ...", flush=True)
                full = scale in suite["full_epoch"] and not args.steps_only
                extra = ["--full-epoch"] if full else []
                if full:
                    timed = 1 if scale == "elec" else args.epochs_timed
                    extra += ["--epochs-timed", str(timed)]
                if scale in PROFILED:
                    extra += ["--profile-steps", str(args.profile_steps)]
                row = run_child(["train", "--scale", scale, *common, *extra])
                row.setdefault("scale", scale)
                row["code"] = "this revision"
                result["train"].append(row)
                ours[scale] = row
                save()
                if baseline is not None and scale in ("tiktok", "baby", "synthetic"):
                    print(f"train {scale} (baseline {args.baseline_rev}) ...", flush=True)
                    old = run_child(["train", "--scale", scale, *common, *extra], baseline)
                    old.setdefault("scale", scale)
                    old["code"] = f"baseline {args.baseline_rev}"
                    result["train"].append(old)
                    save()
            shutil.rmtree(tmp, ignore_errors=True)
    if "reference" in sections and args.reference_dir:
        from benchmarks.reference_cm3 import time_reference

        result["reference"] = []
        for scale in ("tiktok", "baby"):
            print(f"reference {scale} ...", flush=True)
            ref = time_reference(
                args.reference_dir,
                scale,
                epochs=args.reference_epochs,
                data_root=args.data_root,
                python=args.reference_python,
            )
            mine = ours.get(scale) or run_child(
                [
                    "train",
                    "--scale",
                    scale,
                    *common,
                    "--full-epoch",
                    "--epochs-timed",
                    str(args.epochs_timed),
                ]
            )
            row = {
                "scale": scale,
                "reference": ref,
                "reference_seconds_per_epoch": ref.get("median_epoch_seconds"),
                "ours_seconds_per_epoch": mine.get("seconds_per_epoch"),
                "ours_epoch_seconds": mine.get("epoch_seconds"),
                "encoder_floor_seconds_per_epoch": mine.get("encoder_floor_seconds_per_epoch"),
            }
            if row["reference_seconds_per_epoch"] and row["ours_seconds_per_epoch"]:
                row["ratio"] = row["ours_seconds_per_epoch"] / row["reference_seconds_per_epoch"]
            result["reference"].append(row)
            save()
    save()
    print(to_markdown(merge_results(previous, result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
