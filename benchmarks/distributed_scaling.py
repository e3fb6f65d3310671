"""The scaling model of multi-process training (BENCHMARKS.md), and its predictions.

    python -m benchmarks.distributed_scaling                  # Elec and 10x Elec, 1-8 processes

Per training step and process, for ``P`` processes (:mod:`cm3_pyg.training.distributed`):

* **divided compute**: the item feature encoders (``feature_linear``) and every sparse
  product of propagation; each process does ``1 / P`` of it.
* **replicated compute**: everything else (fusion, row normalisation, layer sums, the
  batch's loss terms, the optimiser), the same on every process.
* **traffic**: each divided operation all-gathers its ``[n, F]`` output (forward, padded
  blocks: ``P * ceil(n / P) * F`` elements arrive) and reduce-scatters the ``[n, F]``
  gradient of it (backward: each process receives its block of the sum); the parameter
  gradients are reduce-scattered and the updated parameter blocks all-gathered once
  (:class:`~cm3_pyg.training.distributed.DividedOptimizer`).

:func:`cm3_traffic` and :func:`lightgcn_traffic` count those elements; the tests check
them against the counters of :func:`cm3_pyg.nn.parallel.count_traffic` in a real
two-process run. :func:`predict` turns a model of one step into seconds for ``P``
processes from stated device figures; it is a model, not a measurement.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Graph:
    """The sizes a CM3 / LightGCN step depends on.

    Attributes:
        num_users, num_items: ``U``, ``I``.
        feature_dims: ``d_m`` per modality (CM3).
        ui_nnz: stored entries of the normalised ``[U + I, U + I]`` graph (``2 x`` train rows).
        item_nnz: stored entries of the ``[I, I]`` item graph (``k I`` for a kNN graph).
        embedding_dim: ``d``.
        ui_layers: ``L``; mm_layers: ``n`` (CM3's item-graph layers).
        batch: training batch rows ``B``.
    """

    num_users: int
    num_items: int
    feature_dims: tuple[int, ...]
    ui_nnz: int
    item_nnz: int
    embedding_dim: int = 64
    ui_layers: int = 3
    mm_layers: int = 1
    batch: int = 2048

    @property
    def nodes(self) -> int:
        return self.num_users + self.num_items

    @property
    def channels(self) -> int:
        return len(self.feature_dims) + 1


@dataclass(frozen=True)
class Traffic:
    """Elements one process hands to collectives in one training step."""

    gathers: int
    gathered: int
    scatters: int
    scattered: int
    reduces: int
    reduced: int


def _padded(rows: int, world_size: int) -> int:
    return world_size * math.ceil(rows / world_size)


def cm3_parameters(g: Graph) -> int:
    """CM3's trainable parameters: per modality the encoder ``d_m -> 4d -> d`` (first layer
    with bias) and the fusion projection ``d_m -> d`` (with bias); per user ``C`` free
    embeddings of ``d`` and ``C`` channel logits."""
    d = g.embedding_dim
    per_modality = sum(dm * 4 * d + 4 * d + 4 * d * d + dm * d + d for dm in g.feature_dims)
    return per_modality + g.channels * g.num_users * d + g.num_users * g.channels


def cm3_traffic(g: Graph, world_size: int) -> tuple[Traffic, Traffic]:
    """``(training step, evaluation forward)`` traffic of CM3 for ``world_size`` processes."""
    d, width = g.embedding_dim, g.channels * g.embedding_dim
    # (rows, width) of every divided operation, in forward order
    outputs = [(g.num_items, 5 * d)] * len(g.feature_dims)  # encoder layer 1 + projection
    outputs += [(g.nodes, width)] * g.ui_layers + [(g.num_items, width)] * g.mm_layers
    gathered = sum(_padded(rows, world_size) * f for rows, f in outputs)
    # + the parameters: gradients reduce-scattered, updated blocks all-gathered
    params = _padded(cm3_parameters(g), world_size)
    n = len(outputs) + 1
    step = Traffic(n, gathered + params, n, gathered + params, 0, 0)
    return step, Traffic(len(outputs), gathered, 0, 0, 0, 0)


def lightgcn_traffic(g: Graph, world_size: int) -> tuple[Traffic, Traffic]:
    """``(training step, evaluation forward)`` traffic of LightGCN."""
    d = g.embedding_dim
    gathered = g.ui_layers * _padded(g.nodes, world_size) * d
    params = _padded(g.nodes * d, world_size)
    n = g.ui_layers + 1
    step = Traffic(n, gathered + params, n, gathered + params, 0, 0)
    return step, Traffic(g.ui_layers, gathered, 0, 0, 0, 0)


def cm3_divided_work(g: Graph) -> tuple[float, float]:
    """``(GEMM FLOPs, bytes)`` of one CM3 step's divided operations, forward and backward.

    The encoders: ``2 n k m`` per GEMM; a forward and both gradient products for the second
    layer, a forward and the weight gradient for the first (its input, the features, needs
    none). The bytes: the sparse products, memory-bound (per product and direction each
    stored entry reads its column index and value, 12 bytes, and a gathered row of ``F``
    floats, and the ``[n, F]`` output is written), and the optimiser step (Adam's 4 passes
    over the parameters).
    """
    d, width = g.embedding_dim, g.channels * g.embedding_dim
    gemm = sum(
        2 * 2 * g.num_items * dm * 5 * d + 3 * 2 * g.num_items * 4 * d * d for dm in g.feature_dims
    )
    products = [(g.ui_nnz, g.nodes)] * g.ui_layers + [(g.item_nnz, g.num_items)] * g.mm_layers
    sparse = sum(2 * (nnz * (12 + 4 * width) + 4 * rows * width) for nnz, rows in products)
    # Adam's 4 float32 passes over the parameters (DividedOptimizer: each process its block)
    adam = 4 * 4 * cm3_parameters(g)
    return float(gemm), float(sparse + adam)


def cm3_replicated_work(g: Graph) -> tuple[float, float]:
    """``(FLOPs, bytes)`` of one CM3 step's replicated work: the pairwise loss GEMMs over the
    batch (users and negatives, ``B x B`` each, forward and backward: ``2 * 6 B^2 C d``), and
    about 12 float32 passes over the ``[U + I, C d]`` node table (channel input, layer sums,
    their gradients, the gathered gradients' sum) plus 2 over the parameters (the flattened
    gradients, the gathered parameters copied back)."""
    width = g.channels * g.embedding_dim
    flops = 2 * 6 * g.batch**2 * width
    passes = 4.0 * (12 * g.nodes * width + 2 * cm3_parameters(g))
    return float(flops), passes


@dataclass(frozen=True)
class Device:
    """The figures :func:`predict` assumes (stated in BENCHMARKS.md)."""

    name: str
    flops: float  # sustained float32 GEMM rate on these shapes, FLOP/s
    memory_bandwidth: float  # sustained bytes/s
    link_bandwidth: float  # bus bandwidth of ring collectives per process, bytes/s
    latency: float  # seconds per collective


#: One H100 SXM of eight on NVLink 4: float32 GEMMs without TF32 (67 TFLOP/s peak) at 30
#: TFLOP/s on these skinny shapes; 2.5 of the 3.35 TB/s HBM; NCCL ring collectives at a bus
#: bandwidth of 300 GB/s; 30 us per collective.
H100 = Device("H100 SXM x 8, NVLink", 30e12, 2.5e12, 300e9, 30e-6)


def moved_bytes(g: Graph, world_size: int) -> float:
    """Bytes one process sends (= receives) per CM3 step in ring collectives."""
    step, _ = cm3_traffic(g, world_size)
    share = (world_size - 1) / world_size
    return 4.0 * share * (step.gathered + step.scattered + 2 * step.reduced)


def predict(g: Graph, world_size: int, device: Device = H100) -> dict[str, float]:
    """Seconds of one CM3 step on ``world_size`` processes under this module's model: the
    divided work ``/ P``, the replicated work, and the collectives (a ring all-gather and a
    ring reduce-scatter move ``(P-1)/P`` of their elements, a ring all-reduce ``2 (P-1)/P``,
    4 bytes each, plus a latency per collective)."""
    gemm, sparse = cm3_divided_work(g)
    flops, passes = cm3_replicated_work(g)
    step, _ = cm3_traffic(g, world_size)
    divided = (gemm / device.flops + sparse / device.memory_bandwidth) / world_size
    replicated = flops / device.flops + passes / device.memory_bandwidth
    comm = 0.0
    if world_size > 1:
        comm = moved_bytes(g, world_size) / device.link_bandwidth
        comm += (step.gathers + step.scatters + step.reduces) * device.latency
    return {
        "divided": divided,
        "replicated": replicated,
        "communication": comm,
        "step": divided + replicated + comm,
    }


#: Amazon Electronics (MMRec's 5-core), CM3 defaults, knn_k 10.
ELEC = Graph(192_403, 63_001, (4096, 384), ui_nnz=2 * 1_250_550, item_nnz=10 * 63_001)


def scaled(g: Graph, factor: int) -> Graph:
    """``g`` with ``factor`` times the users, items and edges (same degrees and widths)."""
    return Graph(
        g.num_users * factor,
        g.num_items * factor,
        g.feature_dims,
        g.ui_nnz * factor,
        g.item_nnz * factor,
        g.embedding_dim,
        g.ui_layers,
        g.mm_layers,
        g.batch,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4,8")
    args = parser.parse_args(argv)
    counts = [int(p) for p in args.processes.split(",")]
    print(f"device model: {H100}")
    print(
        "| graph | P | divided ms | replicated ms | collectives ms | step ms | speed-up | "
        "MB moved per process |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, graph in (("Elec", ELEC), ("10x Elec", scaled(ELEC, 10))):
        one = predict(graph, 1)["step"]
        for p in counts:
            t = predict(graph, p)
            moved = moved_bytes(graph, p) / 1e6
            print(
                f"| {label} | {p} | {1e3 * t['divided']:.1f} | {1e3 * t['replicated']:.1f} | "
                f"{1e3 * t['communication']:.1f} | {1e3 * t['step']:.1f} | {one / t['step']:.2f} | "
                f"{moved:.0f} |"
            )


if __name__ == "__main__":
    main()
