r"""Graph construction for CM3: item-item cosine k-NN graphs and the user-item adjacency.

Everything here is a pure function on tensors (no dataset, no model). All graphs are
returned in COO form ``(edge_index [2, E] int64, edge_weight [E] float32)``, coalesced
(no duplicate pairs) and sorted by row then column, so they convert to CSR directly.

* :func:`cosine_topk` -- for every row of a feature matrix the ``k`` most cosine-similar
  rows (itself included), computed block-wise so that memory stays
  :math:`O(\text{block} \cdot N)` and never :math:`O(N^2)`.
* :func:`knn_normalized_adjacency` -- the binary directed k-NN graph normalised as
  :math:`S_{ij} = d_i^{-1/2} d_j^{-1/2}` (row degrees), as in the CM3 reference.
* :func:`combine_weighted` -- :math:`S = \sum_m w_m S_m`.
* :func:`modality_weights` -- the rule that chooses the :math:`w_m`.
* :func:`bipartite_normalized_adjacency` -- :math:`D^{-1/2} A D^{-1/2}` of the user-item
  bipartite graph over the :math:`U + I` nodes (LightGCN propagation matrix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch_geometric.utils import coalesce

from cm3_pyg.errors import ConfigError

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "bipartite_normalized_adjacency",
    "combine_weighted",
    "cosine_topk",
    "default_block_size",
    "knn_normalized_adjacency",
    "modality_weights",
]

#: Budget (bytes) for one ``[block, N]`` float32 similarity block when ``block_size`` is
#: not given: 256 MiB.
DEFAULT_BLOCK_BYTES: int = 256 * 1024 * 1024

Graph = tuple[Tensor, Tensor]


def default_block_size(num_rows: int, budget_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    r"""Number of query rows per block so that one float32 ``[block, N]`` block fits.

    .. math::
        \text{block} = \operatorname{clip}\bigl(\lfloor B / (4 N) \rfloor,\ 1,\ N\bigr)

    Args:
        num_rows: :math:`N`, the number of rows compared against.
        budget_bytes: :math:`B`, the memory budget of one block (default 256 MiB).

    Returns:
        The block size, at least 1 and at most ``max(num_rows, 1)``.
    """
    num_rows = max(int(num_rows), 1)
    return max(1, min(num_rows, budget_bytes // (4 * num_rows)))


def _safe_unit_rows(x: Tensor) -> Tensor:
    r"""Rows of ``x`` scaled to unit L2 norm; all-zero rows stay zero (never NaN).

    The row is first divided by its largest absolute entry so that squaring can neither
    overflow nor underflow, then by its norm: :math:`\hat x = (x/s)/\lVert x/s \rVert`
    with :math:`s = \max_j |x_j|`. Computed in the dtype of ``x``.
    """
    scale = x.abs().amax(dim=1, keepdim=True)
    scale = scale.masked_fill(scale == 0, 1.0)
    y = x / scale
    norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    norm = norm.masked_fill(norm == 0, 1.0)
    return y / norm


@torch.no_grad()
def cosine_topk(
    x: Tensor,
    k: int,
    block_size: int | None = None,
    rows: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The ``k`` most cosine-similar rows of every row of ``x``, the row itself included.

    With :math:`\hat x_i = x_i / \lVert x_i \rVert` the similarity is
    :math:`s_{ij} = \hat x_i^\top \hat x_j`, and row :math:`i` gets
    :math:`\operatorname{topk}_j s_{ij}` (descending). A row's similarity with itself is
    :math:`1`, the maximum, so for pairwise distinct directions the row itself is always
    among its neighbours (the reference keeps the self loop too). An all-zero row has
    similarity :math:`0` with every row, itself included, instead of NaN.

    The rows are normalised once; then, for each block of ``block_size`` query rows, the
    block product :math:`\hat X_{b} \hat X^\top` (shape ``[block, N]``) is formed and
    reduced with ``topk``. Peak extra memory is :math:`O(\text{block} \cdot N + N d)`; an
    :math:`N \times N` matrix is never allocated. The similarity is computed in float32
    (float64 input is normalised in float64 first, then cast). The result is
    deterministic: each row's top-k depends only on that row's block product.

    Args:
        x: Features, shape ``[N, d]`` (any real dtype; float64 accepted).
        k: Number of neighbours, :math:`1 \le k \le N`.
        block_size: Query rows per block; default keeps one block under
            :data:`DEFAULT_BLOCK_BYTES` (see :func:`default_block_size`).
        rows: ``(start, stop)``: only these query rows (their neighbours still range over
            every row), e.g. one process's share; the default is all ``N``. The blocks
            start at ``start``, so with ``start`` a multiple of ``block_size`` (and ``stop``
            one too, or ``N``) every block product, and so every row's result, is bit for
            bit the full call's; otherwise a product of other shape may round differently.

    Returns:
        ``(values, indices)``: float32 ``[R, k]`` similarities in descending order per row
        and the int64 ``[R, k]`` column indices they belong to (``R = stop - start``, ``N``
        by default).

    Raises:
        ValueError: if ``x`` is not 2-D, contains NaN/inf, ``k`` is out of range or
            ``block_size < 1``.
    """
    if x.dim() != 2:
        raise ValueError(f"cosine_topk expects a 2-D feature matrix [N, d], got {tuple(x.shape)}")
    num_rows = x.size(0)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_rows:
        raise ValueError(f"k must be an int in [1, N={num_rows}], got {k!r}")
    if block_size is None:
        block_size = default_block_size(num_rows)
    elif isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    first, last = (0, num_rows) if rows is None else rows
    if not (
        isinstance(first, int)
        and isinstance(last, int)
        and not isinstance(first, bool)
        and not isinstance(last, bool)
        and 0 <= first <= last <= num_rows
    ):
        raise ValueError(
            f"rows must be (start, stop) with 0 <= start <= stop <= {num_rows}, got {rows!r}"
        )

    if not x.is_floating_point():
        x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"features must be finite; row {bad} contains NaN or inf")

    xn = _safe_unit_rows(x).to(torch.float32).contiguous()  # [N, d]
    # the transposed operand as a view: BLAS reads it in place, so the only full-size
    # temporary is xn (a contiguous transpose was a second [d, N] copy at loading's peak)
    xn_t = xn.t()

    values = torch.empty(last - first, k, dtype=torch.float32, device=x.device)
    indices = torch.empty(last - first, k, dtype=torch.long, device=x.device)
    for start in range(first, last, block_size):
        stop = min(start + block_size, last)
        sim = torch.mm(xn[start:stop], xn_t)  # [block, N]
        top = torch.topk(sim, k, dim=1, largest=True, sorted=True)
        values[start - first : stop - first] = top.values
        indices[start - first : stop - first] = top.indices
        del sim, top
    return values, indices


def knn_normalized_adjacency(indices: Tensor, num_nodes: int | None = None) -> Graph:
    r"""Normalised adjacency of the directed k-NN graph given by ``indices``.

    The binary matrix has :math:`A_{ij} = 1` iff :math:`j` is one of the ``k`` neighbours
    of :math:`i` (edge :math:`i \to j`, row ``i`` = ``edge_index[0]``). With the ROW
    (out-)degree :math:`d_i = \sum_j A_{ij}` the weights are

    .. math::
        S_{ij} = d_i^{-1/2} \, A_{ij} \, d_j^{-1/2},

    which is the reference's ``compute_normalized_laplacian`` (it also normalises both
    sides by row sums, not by in-degree, so :math:`S` is *not* symmetric in general and
    the graph stays directed). For a plain k-NN graph every :math:`d_i = k`, hence every
    weight equals :math:`1/k`. The reference adds :math:`10^{-7}` to the degree; that
    shifts :math:`1/k` by a relative :math:`\approx 10^{-8}`, below float32 resolution,
    so the exact degree is used here; a zero degree (impossible with ``k >= 1``) would
    give weight 0, never inf.

    Args:
        indices: Neighbour indices, int ``[N, k]`` (row ``i`` lists the neighbours of
            node ``i``; no repeated neighbour within a row).
        num_nodes: :math:`N`; defaults to ``indices.size(0)`` and must equal it.

    Returns:
        ``(edge_index [2, N k], edge_weight [N k] float32)``, sorted by row then column.

    Raises:
        ValueError: on a wrong shape, an index out of ``[0, N)`` or a repeated neighbour.
    """
    if indices.dim() != 2:
        raise ValueError(f"indices must be 2-D [N, k], got shape {tuple(indices.shape)}")
    n, k = indices.shape
    if num_nodes is None:
        num_nodes = n
    if n != num_nodes:
        raise ValueError(
            f"indices has {n} rows but num_nodes={num_nodes}; expected one row per node"
        )
    indices = indices.to(torch.long)
    if indices.numel() > 0 and (int(indices.min()) < 0 or int(indices.max()) >= num_nodes):
        raise ValueError(f"neighbour indices must lie in [0, {num_nodes})")
    if k > 1:
        srt = indices.sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
        if bool(dup.any()):
            raise ValueError(f"row {int(dup.nonzero()[0, 0])} of indices repeats a neighbour")

    row = torch.arange(n, device=indices.device).repeat_interleave(k)
    col = indices.reshape(-1)
    deg = torch.bincount(row, minlength=num_nodes).to(torch.float32)
    inv_sqrt = torch.where(deg > 0, deg.clamp_min(1.0).pow(-0.5), torch.zeros_like(deg))
    weight = inv_sqrt[row] * inv_sqrt[col]
    edge_index, edge_weight = coalesce(torch.stack([row, col]), weight, num_nodes=num_nodes)
    return edge_index, edge_weight


def combine_weighted(
    graphs: Sequence[Graph],
    weights: Sequence[float],
    num_nodes: int,
) -> Graph:
    r"""Weighted sum of sparse graphs: :math:`S = \sum_m w_m S_m`.

    Duplicate pairs :math:`(i, j)` across graphs are summed. Graphs whose weight is exactly
    0 contribute nothing and are skipped (their edges do not appear).

    Args:
        graphs: ``M`` pairs ``(edge_index [2, E_m], edge_weight [E_m])`` on ``num_nodes``.
        weights: ``M`` scalars :math:`w_m`.
        num_nodes: Number of nodes of every graph.

    Returns:
        ``(edge_index [2, E], edge_weight [E])``, coalesced and sorted by row then column.

    Raises:
        ValueError: if ``graphs`` is empty or its length differs from ``weights``.
    """
    if len(graphs) == 0:
        raise ValueError("combine_weighted needs at least one graph")
    if len(graphs) != len(weights):
        raise ValueError(f"got {len(graphs)} graphs but {len(weights)} weights")
    ref_index = graphs[0][0]
    dtype = torch.result_type(graphs[0][1], 1.0)
    indices: list[Tensor] = []
    values: list[Tensor] = []
    for (edge_index, edge_weight), w in zip(graphs, weights, strict=True):
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
        if edge_weight.numel() != edge_index.size(1):
            raise ValueError(
                f"edge_weight has {edge_weight.numel()} entries for {edge_index.size(1)} edges"
            )
        if float(w) == 0.0:
            continue
        indices.append(edge_index.to(torch.long))
        values.append(edge_weight.to(dtype) * float(w))
    if not indices:
        empty = torch.empty(2, 0, dtype=torch.long, device=ref_index.device)
        return empty, torch.empty(0, dtype=dtype, device=ref_index.device)
    edge_index, edge_weight = coalesce(
        torch.cat(indices, dim=1), torch.cat(values), num_nodes=num_nodes, reduce="sum"
    )
    return edge_index, edge_weight


def modality_weights(
    modalities: Sequence[str],
    weights: Mapping[str, float] | None = None,
    mm_image_weight: float | None = None,
) -> list[float]:
    r"""Weights :math:`w_m` of the per-modality item graphs in :math:`S = \sum_m w_m S_m`.

    The rule, first match wins:

    1. ``weights`` given: it must name every modality exactly (no missing or unknown key),
       with finite non-negative values of positive sum; they are normalised to sum 1.
    2. exactly two modalities, one of them ``'image'``, and ``mm_image_weight`` given:
       image gets ``mm_image_weight``, the other ``1 - mm_image_weight`` (the reference
       uses 0.1 image / 0.9 text).
    3. otherwise uniform, :math:`w_m = 1/M`.

    Args:
        modalities: Modality names, in order (distinct, at least one).
        weights: Optional explicit map modality -> weight.
        mm_image_weight: Optional image weight for the two-modality rule, in ``[0, 1]``.

    Returns:
        ``M`` floats in the order of ``modalities``, summing to 1.

    Raises:
        ConfigError: (a ``ValueError``) naming the offending key or value.
    """
    if weights is not None:
        if not isinstance(weights, Mapping):
            raise ConfigError(
                "weights must be a mapping of modality name to weight, e.g. "
                f"{{image: 0.3, text: 0.7}}, got {weights!r}"
            )
        if not weights:
            raise ConfigError("weights is empty; it must name every modality")
    mods = list(modalities)
    if not mods:
        raise ConfigError("modalities must name at least one modality")
    if len(set(mods)) != len(mods):
        raise ConfigError(f"modalities must be distinct, got {mods}")

    if weights is not None:
        unknown = [key for key in weights if key not in mods]
        if unknown:
            raise ConfigError(
                f"weights names unknown modality {unknown[0]!r}; modalities are {mods}"
            )
        missing = [m for m in mods if m not in weights]
        if missing:
            raise ConfigError(f"weights is missing modality {missing[0]!r}; it must name {mods}")
        raw: list[float] = []
        for m in mods:
            try:
                value = float(weights[m])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"weights[{m!r}] must be a number, got {weights[m]!r}") from exc
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"weights[{m!r}] must be finite and >= 0, got {weights[m]!r}")
            raw.append(value)
        total = sum(raw)
        if total <= 0:
            raise ConfigError(f"weights must not all be zero, got {dict(weights)}")
        return [value / total for value in raw]

    if mm_image_weight is not None:
        w_img = float(mm_image_weight)
        if not math.isfinite(w_img) or not 0.0 <= w_img <= 1.0:
            raise ConfigError(f"mm_image_weight must lie in [0, 1], got {mm_image_weight!r}")
        if len(mods) == 2 and "image" in mods:
            return [w_img if m == "image" else 1.0 - w_img for m in mods]

    return [1.0 / len(mods)] * len(mods)


def bipartite_normalized_adjacency(
    edge_index: Tensor,
    num_users: int,
    num_items: int,
) -> Graph:
    r"""Symmetric normalised adjacency of the user-item bipartite graph (LightGCN).

    Nodes are the users ``0..U-1`` followed by the items ``U..U+I-1``. With the binary
    (deduplicated) interaction matrix :math:`R \in \{0,1\}^{U \times I}`,

    .. math::
        A = \begin{pmatrix} 0 & R \\ R^\top & 0 \end{pmatrix}, \qquad
        \tilde A = D^{-1/2} A D^{-1/2}, \quad D = \operatorname{diag}(A \mathbf 1),

    i.e. :math:`\tilde A_{u, U+i} = \tilde A_{U+i, u} = 1/\sqrt{d_u d_i}`. No self loops.
    Isolated nodes simply have no edges (no inf/NaN), matching the reference's
    :math:`+10^{-7}` guard in effect.

    Args:
        edge_index: int ``[2, E]`` interactions, row user id, col item id (repeats allowed).
        num_users: :math:`U`.
        num_items: :math:`I`.

    Returns:
        ``(edge_index [2, 2E'], edge_weight [2E'] float32)`` with :math:`E'` the number of
        distinct interactions, sorted by row then column (CSR-ready).

    Raises:
        ValueError: on a wrong shape or an id out of range.
    """
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must have shape [2, E], got {tuple(edge_index.shape)}")
    if num_users < 0 or num_items < 0:
        raise ValueError(f"num_users and num_items must be >= 0, got {num_users}, {num_items}")
    edge_index = edge_index.to(torch.long)
    users, items = edge_index[0], edge_index[1]
    if users.numel() > 0:
        if int(users.min()) < 0 or int(users.max()) >= num_users:
            raise ValueError(f"user ids must lie in [0, {num_users})")
        if int(items.min()) < 0 or int(items.max()) >= num_items:
            raise ValueError(f"item ids must lie in [0, {num_items})")
    num_nodes = num_users + num_items

    ui = coalesce(torch.stack([users, items + num_users]), num_nodes=num_nodes)
    row = torch.cat([ui[0], ui[1]])
    col = torch.cat([ui[1], ui[0]])
    deg = torch.bincount(row, minlength=num_nodes).to(torch.float32)
    inv_sqrt = torch.where(deg > 0, deg.clamp_min(1.0).pow(-0.5), torch.zeros_like(deg))
    weight = inv_sqrt[row] * inv_sqrt[col]
    out_index, out_weight = coalesce(torch.stack([row, col]), weight, num_nodes=num_nodes)
    return out_index, out_weight
