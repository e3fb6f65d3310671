r"""Propagation over pre-normalised sparse graphs."""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.nn.conv import MessagePassing

from cm3_pyg.checks import check_choice, check_int, check_tensor
from cm3_pyg.nn.sparse import COMBINE_MODES, Adjacency, as_adjacency, combine_layers, spmm


class UserItemPropagation(MessagePassing):
    r"""LightGCN-style propagation over a pre-normalised adjacency.

    .. math::
        \mathbf{H}^{(0)} = \mathbf{X}, \qquad
        \mathbf{H}^{(l+1)} = \hat{\mathbf{A}} \mathbf{H}^{(l)}, \qquad
        \mathrm{out} = \mathrm{combine}(\mathbf{H}^{(0)}, \dots, \mathbf{H}^{(L)})

    where :math:`\hat{\mathbf{A}}` is normalised once, outside the layer (for the
    user-item graph :math:`\mathbf{D}^{-1/2}\mathbf{A}\mathbf{D}^{-1/2}`), and ``combine``
    is the sum of all layers (CM3, LightGCN's propagation without averaging), their mean
    (LightGCN, BM3), or the last layer alone.

    The layer has no parameters. With a :class:`~cm3_pyg.nn.sparse.SparseAdjacency` (from
    :func:`~cm3_pyg.nn.to_adjacency`; a torch CSR/COO tensor or a ``torch_sparse.SparseTensor``
    is converted by :func:`~cm3_pyg.nn.as_adjacency` on each call) all layers run as sparse
    products (:meth:`~cm3_pyg.nn.sparse.SparseAdjacency.propagate`); with an ``edge_index``
    and ``edge_weight`` it falls back to explicit messages, so results agree either way.

    Args:
        num_layers: number of propagation steps ``L`` (>= 0).
        combine: ``"sum"``, ``"mean"`` or ``"last"``.

    Shapes:
        input: ``x`` ``[N, F]``; ``adj_t`` sparse ``[N, N]`` with ``out = adj_t @ x`` or
        ``edge_index`` ``[2, E]`` (messages flow ``edge_index[0] -> edge_index[1]``) with
        ``edge_weight`` ``[E]``.
        output: ``[N, F]``.
    """

    COMBINE_MODES = COMBINE_MODES

    def __init__(self, num_layers: int, combine: str = "sum") -> None:
        super().__init__(aggr="add")
        self.num_layers = check_int(num_layers, "UserItemPropagation: num_layers", minimum=0)
        self.combine = check_choice(combine, "UserItemPropagation: combine", self.COMBINE_MODES)

    def reset_parameters(self) -> None:
        """No learnable parameters."""

    def forward(
        self, x: Tensor, adj_t: Adjacency | Tensor, edge_weight: Tensor | None = None
    ) -> Tensor:
        if not _is_edge_index(adj_t):
            # PyG's propagate() does not know this type; all layers run as one fused node.
            adj = as_adjacency(adj_t, "adj_t")
            return adj.propagate(x, self.num_layers, self.combine)
        _check_edge_input(x, adj_t, edge_weight)
        return combine_layers(
            lambda h: self.propagate(adj_t, x=h, edge_weight=edge_weight),
            x,
            self.num_layers,
            self.combine,
        )

    def forward_rows(
        self, x: Tensor, adj_t: Adjacency, num_users: int, users: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(out[users], out[num_users:])`` of :meth:`forward` on a user-item graph (users
        first): the rows a training batch reads.

        With a symmetric bipartite CSR :class:`~cm3_pyg.nn.sparse.SparseAdjacency` the last
        layer is formed only for those rows
        (:meth:`~cm3_pyg.nn.sparse.SparseAdjacency.propagate_rows`); otherwise the full
        output is split and gathered. Same values and gradients either way.

        Args:
            x: ``[U + I, F]``.
            adj_t: the adjacency (no ``edge_index`` form; other sparse representations are
                converted by :func:`~cm3_pyg.nn.as_adjacency`).
            num_users: ``U``.
            users: ``[B]`` user ids.

        Returns:
            ``[B, F]`` and ``[I, F]``.
        """
        adj = as_adjacency(adj_t, "adj_t")
        num_users = check_int(num_users, "forward_rows: num_users", minimum=0)
        if num_users > adj.shape[0]:
            raise ValueError(
                f"forward_rows: num_users ({num_users}) exceeds the adjacency's "
                f"{adj.shape[0]} nodes"
            )
        return adj.propagate_rows(x, self.num_layers, self.combine, num_users, users)

    def message(self, x_j: Tensor, edge_weight: Tensor | None) -> Tensor:
        return x_j if edge_weight is None else x_j * edge_weight.view(-1, 1)

    def message_and_aggregate(self, adj_t: Adjacency, x: Tensor) -> Tensor:
        return spmm(adj_t, x)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(num_layers={self.num_layers}, combine={self.combine!r})"


def _is_edge_index(adj_t: object) -> bool:
    """Whether ``adj_t`` is a dense ``[2, E]`` index (PyG's message-passing form)."""
    return isinstance(adj_t, Tensor) and adj_t.layout == torch.strided


def _check_edge_input(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> None:
    """The message-passing form's inputs: ``x`` ``[N, F]``, ``edge_index`` an integer
    ``[2, E]`` of node ids in ``[0, N)`` (read on the CPU only), ``edge_weight`` ``[E]``."""
    check_tensor(x, "UserItemPropagation: x", dims=2, floating=True)
    check_tensor(edge_index, "UserItemPropagation: edge_index", dims=2, integer=True)
    if edge_index.size(0) != 2:
        raise ValueError(
            f"UserItemPropagation: edge_index must have shape [2, E], got {list(edge_index.shape)}"
        )
    if edge_index.device.type == "cpu" and edge_index.numel():
        low, high = int(edge_index.min()), int(edge_index.max())
        if low < 0 or high >= x.size(0):
            raise ValueError(
                f"UserItemPropagation: edge_index holds node id {low if low < 0 else high}, "
                f"outside [0, {x.size(0)}) (x has {x.size(0)} rows)"
            )
    if edge_weight is not None:
        check_tensor(edge_weight, "UserItemPropagation: edge_weight", dims=1, floating=True)
        if edge_weight.size(0) != edge_index.size(1):
            raise ValueError(
                f"UserItemPropagation: edge_weight must have shape [{edge_index.size(1)}], "
                f"got {list(edge_weight.shape)}"
            )


def propagate_item_graph(h: Tensor, item_adj: Adjacency, num_layers: int) -> Tensor:
    r"""The item-item graph step of CM3/FREEDOM: :math:`h + S^{n} h` (``num_layers = n``)."""
    num_layers = check_int(num_layers, "propagate_item_graph: num_layers", minimum=0)
    check_tensor(h, "propagate_item_graph: h", dims=2, floating=True)
    adj = as_adjacency(item_adj, "item_adj")
    out = h
    for _ in range(num_layers):
        out = adj.matmul(out)
    return h + out if num_layers > 0 else h


__all__ = ["UserItemPropagation", "propagate_item_graph"]
