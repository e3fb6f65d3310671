r"""FREEDOM: freezing and denoising graph structures for multimodal recommendation.

Zhou & Shen, ACM MM 2023 ("A Tale of Two Graphs").

Reference followed: MMRec's ``FREEDOM`` (github.com/enoche/MMRec, ``src/models/freedom.py``,
identical to github.com/enoche/FREEDOM):

* the item-item graph is built once from the raw features and frozen (``GraphInputs.item_adj``:
  per-modality cosine top-``knn_k`` graphs, :math:`d^{-1/2}` normalised, mixed with
  ``mm_image_weight``);
* before every epoch, degree-sensitive edge pruning keeps ``(1 - dropout) E`` training edges
  drawn without replacement with probability proportional to
  :math:`1/\sqrt{d_u d_i}`, and renormalises the kept graph;
* LightGCN (mean of layers ``0..n_ui_layers``) over the pruned graph in training and the full
  graph in evaluation, on free ID embeddings; items add :math:`S^{n} e_i` (``n_mm_layers``
  steps of the frozen item graph over the item ID embeddings);
* loss: BPR on the graph embeddings plus ``reg_weight`` times the sum over modalities of a
  BPR loss between the graph user embedding and a linear projection of that modality's
  features. As in the reference, ``reg_weight`` weighs these modality terms (the model has
  no separate L2 penalty), and the raw features are fine-tuned (trainable copies).

Deliberate deviations: any number ``M >= 1`` of modalities (the reference: image and/or
text); the trainable feature copies are zero-initialised offsets added to the frozen
features (same optimisation trajectory with Adam, see ``finetune_features``); the
modality projections map to ``embedding_size`` (the reference's ``feat_embed_dim`` must
equal it anyway for the dot product); the pruned graph is redrawn in
:meth:`FREEDOM.on_epoch_start` (the trainer's per-epoch hook, the reference's
``pre_epoch_processing``) or explicitly with :meth:`FREEDOM.resample_graph`, and drawn
lazily on first use otherwise; ``compute_embeddings`` in training mode uses the current
pruned graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import Linear, ModuleList, Parameter

from cm3_pyg.checks import Range
from cm3_pyg.models._common import (
    FeatureOffsets,
    split_users_items,
    symmetric_bipartite_adjacency,
    user_item_edges,
)
from cm3_pyg.models.base import Batch, BatchRows, GraphInputs, Recommender
from cm3_pyg.nn import UserItemPropagation, bpr_loss, spmm
from cm3_pyg.nn.precision import reduced_linear
from cm3_pyg.nn.sparse import SparseAdjacency


class FREEDOM(Recommender):
    r"""FREEDOM over ``M >= 1`` modalities.

    .. math::
        [U; Q] = \mathrm{mean}_{l=0..L}\, \tilde A^{l} [P; E], \qquad
        \mathbf{q}_i \leftarrow \mathbf{q}_i + (S^{n} E)_i, \qquad
        \hat y_{ui} = \mathbf{u}_u^\top \mathbf{q}_i

    with :math:`\tilde A` the pruned (training) or full (evaluation) normalised user-item
    graph and :math:`S` the frozen item graph. Loss of users :math:`u`, positives :math:`i`,
    negatives :math:`j`, with :math:`f_m = W_m x_m + b_m`:

    .. math::
        \mathcal{L} = \mathrm{BPR}(\mathbf{u}_u, \mathbf{q}_i, \mathbf{q}_j)
        + \lambda \sum_m \mathrm{BPR}(\mathbf{u}_u, f_{m,i}, f_{m,j})

    Args:
        num_users: ``U``.
        num_items: ``I``.
        feature_dims: ``[d_1, ..., d_M]``.
        embedding_dim: ``d``.
        num_ui_layers: LightGCN layers ``L``.
        num_mm_layers: item-graph steps ``n``.
        dropout: fraction of training edges pruned each epoch, in ``[0, 1)``.
        reg_weight: :math:`\lambda`, the weight of the modality BPR terms.
        finetune_features: train per-item corrections of the raw features (the reference
            fine-tunes them); ``False`` keeps them frozen.
    """

    name = "freedom"
    hyperparameter_ranges: ClassVar[dict[str, Range]] = {
        "dropout": Range(0, 1, exclusive_maximum=True)
    }
    min_modalities = 1
    uses_item_graph = True

    def __init__(
        self,
        num_users: int,
        num_items: int,
        feature_dims: Sequence[int],
        embedding_dim: int = 64,
        num_ui_layers: int = 2,
        num_mm_layers: int = 1,
        dropout: float = 0.8,
        reg_weight: float = 1e-4,
        finetune_features: bool = True,
    ) -> None:
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.feature_dims = self.check_feature_dims(feature_dims)
        self.num_modalities = len(self.feature_dims)
        self.embedding_dim = embedding_dim
        self.num_mm_layers = num_mm_layers
        self.dropout = dropout
        self.reg_weight = reg_weight
        self.user_embedding = Parameter(torch.empty(num_users, embedding_dim))
        self.item_embedding = Parameter(torch.empty(num_items, embedding_dim))
        self.projections = ModuleList(Linear(d, embedding_dim) for d in self.feature_dims)
        self.feature_offsets = FeatureOffsets(num_items, self.feature_dims, finetune_features)
        self.propagation = UserItemPropagation(num_ui_layers, combine="mean")
        # State of the degree-sensitive pruning (not parameters, not saved).
        self._edges: tuple[SparseAdjacency, Tensor, Tensor] | None = None
        self._train_adj: SparseAdjacency | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.user_embedding)
        torch.nn.init.xavier_uniform_(self.item_embedding)
        for proj in self.projections:
            proj.reset_parameters()  # the reference keeps PyTorch's default Linear init
        self.feature_offsets.reset_parameters()
        self._train_adj = None

    # --- degree-sensitive edge pruning -------------------------------------------------

    def _edge_list(self, ui_adj: SparseAdjacency) -> tuple[Tensor, Tensor]:
        if self._edges is None or self._edges[0] is not ui_adj:
            edges, weights = user_item_edges(ui_adj, self.num_users)
            self._edges = (ui_adj, edges, weights)
            self._train_adj = None
        return self._edges[1], self._edges[2]

    def prune_edges(self, ui_adj: SparseAdjacency) -> SparseAdjacency:
        r"""A freshly pruned, renormalised ``[U + I, U + I]`` training adjacency.

        Keeps :math:`\lfloor (1 - \mathrm{dropout}) E \rfloor` of the ``E`` edges of
        ``ui_adj``, sampled without replacement with probability proportional to the
        normalised weight :math:`1/\sqrt{d_u d_i}` (low-degree edges are kept more often),
        then applies :math:`D^{-1/2} A D^{-1/2}` with the kept degrees.
        """
        edges, weights = self._edge_list(ui_adj)
        keep = int(edges.size(1) * (1.0 - self.dropout))
        if self.dropout <= 0.0 or keep >= edges.size(1):
            return ui_adj
        if keep == 0:
            raise ValueError(
                f"dropout {self.dropout} prunes every one of the {edges.size(1)} training edges"
            )
        chosen = torch.multinomial(weights, keep, replacement=False)
        return symmetric_bipartite_adjacency(
            edges[:, chosen], self.num_users, self.num_items, ui_adj.backend
        )

    def resample_graph(self, ui_adj: SparseAdjacency) -> SparseAdjacency:
        """Draw the training graph of the next epoch (the reference's ``pre_epoch_processing``)."""
        self._train_adj = self.prune_edges(ui_adj)
        return self._train_adj

    def on_epoch_start(self, epoch: int, inputs: GraphInputs) -> None:
        """A new pruned training graph for every epoch."""
        if self.dropout > 0.0:
            self.resample_graph(inputs.ui_adj)

    def training_adjacency(self, ui_adj: SparseAdjacency) -> SparseAdjacency:
        """The current pruned graph of ``ui_adj`` (drawn now if there is none yet)."""
        if self.dropout <= 0.0:
            return ui_adj
        self._edge_list(ui_adj)  # forgets a graph pruned from a different adjacency
        if self._train_adj is None:
            self.resample_graph(ui_adj)
        return self._train_adj

    # --- model --------------------------------------------------------------------------

    def forward(
        self, ui_adj: SparseAdjacency, item_adj: SparseAdjacency | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(user [U, d], item [I, d])`` over the given user-item graph.

        Args:
            ui_adj: normalised ``[U + I, U + I]`` adjacency (pruned in training).
            item_adj: the frozen ``[I, I]`` item graph, or ``None`` to skip that term.
        """
        x0 = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        h = self.propagation(x0, ui_adj)
        user, item = split_users_items(h, self.num_users)
        if item_adj is not None and self.num_mm_layers > 0:
            side = self.item_embedding
            for _ in range(self.num_mm_layers):
                side = spmm(item_adj, side)
            item = item + side
        return user, item

    def modality_embeddings(self, features: Sequence[Tensor], items: Tensor) -> list[Tensor]:
        """``M`` tensors ``[B, d]``: the projected (fine-tuned) features of ``items``."""
        if len(features) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} feature tensors, got {len(features)}")
        return [
            reduced_linear(self.feature_offsets(m, x, items), proj.weight, proj.bias)
            for m, (proj, x) in enumerate(zip(self.projections, features, strict=True))
        ]

    def batch_rows(self, inputs: GraphInputs, batch: Batch) -> BatchRows:
        user_emb, item_emb = self.compute_embeddings(inputs)
        return BatchRows.gather(user_emb, item_emb, batch)

    def auxiliary_losses(
        self, inputs: GraphInputs, batch: Batch, rows: BatchRows
    ) -> dict[str, Tensor]:
        """Per modality ``m``: ``reg_weight * BPR(u, f_{m,i}, f_{m,j})`` (always BPR: part of
        FREEDOM's method, whichever ranking objective is chosen)."""
        neg = batch.neg_items
        items = torch.cat([batch.pos_items, neg.reshape(-1)])
        out = {}
        # each distinct item projected once (a batch repeats items), then spread
        distinct, inverse = torch.unique(items, return_inverse=True)
        embedded = [
            f.index_select(0, inverse) for f in self.modality_embeddings(inputs.features, distinct)
        ]
        for name, f in zip(inputs.modalities, embedded, strict=True):
            i, j = f.split([batch.pos_items.numel(), neg.numel()])
            j = j.view(*neg.shape, -1)
            out[f"modality_bpr_{name}"] = self.reg_weight * bpr_loss(
                self.score(rows.user, i), self.score(rows.user, j)
            )
        return out

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        ui_adj = self.training_adjacency(inputs.ui_adj) if self.training else inputs.ui_adj
        return self(ui_adj, self.item_graph(inputs))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_users={self.num_users}, num_items={self.num_items}, "
            f"feature_dims={self.feature_dims}, embedding_dim={self.embedding_dim}, "
            f"num_ui_layers={self.propagation.num_layers}, num_mm_layers={self.num_mm_layers}, "
            f"dropout={self.dropout}, reg_weight={self.reg_weight}, "
            f"finetune_features={self.feature_offsets.enabled})"
        )
