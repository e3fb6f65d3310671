r"""VBPR: visual Bayesian personalised ranking (He & McAuley, AAAI 2016), MMRec's version.

Reference followed: MMRec's ``VBPR`` (github.com/enoche/MMRec, ``src/models/vbpr.py``): an
item is the concatenation of a free ID embedding and one linear projection of the
concatenated (frozen) modality features, a user is one free ``2d`` vector (i.e. the
concatenation of an ID and a "visual" preference vector); there are no bias terms. Loss:
BPR plus ``reg_weight`` times MMRec's ``EmbLoss`` of the batch's user, positive and negative
vectors (the full ``2d`` item vectors). Initialisation as the reference: Xavier-uniform
embeddings, Xavier-normal projection weight, zero bias.

Deliberate deviations: any number ``M >= 1`` of modalities is concatenated in the order of
``GraphInputs.features`` (the reference handles image and/or text, text first); the BPR term
is ``-logsigmoid(s+ - s-)`` instead of ``-log(1e-10 + sigmoid(s+ - s-))``; the training loss
projects only the batch's items (the same values as projecting all and indexing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import Linear, Parameter

from cm3_pyg.models._common import embedding_norm_penalty
from cm3_pyg.models.base import Batch, BatchRows, GraphInputs, Recommender
from cm3_pyg.nn.precision import reduced_addmm


class VBPR(Recommender):
    r"""VBPR over ``M >= 1`` modalities.

    .. math::
        \mathbf{q}_i = [\mathbf{e}_i \,\|\, W [x_{i,1} \| \dots \| x_{i,M}] + b], \qquad
        \hat y_{ui} = \mathbf{p}_u^\top \mathbf{q}_i, \quad \mathbf{p}_u \in \mathbb{R}^{2d}

    Loss: BPR on :math:`\hat y` plus
    :math:`\lambda (\lVert p_u \rVert_F + \lVert q_i \rVert_F + \lVert q_j \rVert_F) / B`.

    Args:
        num_users: ``U``.
        num_items: ``I``.
        feature_dims: ``[d_1, ..., d_M]``.
        embedding_dim: ``d`` (users and items end up ``2d``-dimensional).
        reg_weight: :math:`\lambda`.
    """

    name = "vbpr"
    min_modalities = 1
    uses_item_graph = False

    def __init__(
        self,
        num_users: int,
        num_items: int,
        feature_dims: Sequence[int],
        embedding_dim: int = 64,
        reg_weight: float = 1e-3,
    ) -> None:
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.feature_dims = self.check_feature_dims(feature_dims)
        self.num_modalities = len(self.feature_dims)
        self.embedding_dim = embedding_dim
        self.reg_weight = reg_weight
        self.user_embedding = Parameter(torch.empty(num_users, 2 * embedding_dim))
        self.item_embedding = Parameter(torch.empty(num_items, embedding_dim))
        self.projection = Linear(sum(self.feature_dims), embedding_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.user_embedding)
        torch.nn.init.xavier_uniform_(self.item_embedding)
        torch.nn.init.xavier_normal_(self.projection.weight)
        torch.nn.init.zeros_(self.projection.bias)

    def item_vectors(self, features: Sequence[Tensor], items: Tensor | None = None) -> Tensor:
        """``[I, 2d]`` item vectors (or ``[B, 2d]`` for the ids in ``items``)."""
        if len(features) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} feature tensors, got {len(features)}")
        ids = self.item_embedding
        if items is not None:
            features = [x.index_select(0, items) for x in features]
            ids = ids.index_select(0, items)
        # projection(concat_m x_m) as sum_m x_m W_m^T + b over the column blocks W_m of the
        # weight: the same product without copying the tables into one [n, sum d_m] matrix
        weight, projected = self.projection.weight, self.projection.bias
        offset = 0
        for x in features:
            block = weight[:, offset : offset + x.size(1)]
            projected = reduced_addmm(projected, x, block.t())
            offset += x.size(1)
        return torch.cat([ids, projected], dim=-1)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(user [U, 2d], item [I, 2d])`` from the ``M`` feature tensors ``[I, d_m]``."""
        return self.user_embedding, self.item_vectors(features)

    def batch_rows(self, inputs: GraphInputs, batch: Batch) -> BatchRows:
        # Only the batch's items are projected (the same values as projecting all).
        neg_ids = batch.neg_items
        ids = torch.cat([batch.pos_items, neg_ids.reshape(-1)])
        # each distinct item projected once (a batch repeats items), then spread
        distinct, inverse = torch.unique(ids, return_inverse=True)
        items = self.item_vectors(inputs.features, distinct).index_select(0, inverse)
        pos, neg = items.split([batch.pos_items.numel(), neg_ids.numel()])
        neg = neg.view(*neg_ids.shape, -1)
        return BatchRows(self.user_embedding.index_select(0, batch.users), pos, neg)

    def regularization(self, batch: Batch, rows: BatchRows) -> Tensor:
        """``reg_weight`` times MMRec's ``EmbLoss`` of the batch's ``2d`` rows."""
        return self.reg_weight * embedding_norm_penalty(rows.user, rows.pos, rows.neg)

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        return self(inputs.features)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_users={self.num_users}, num_items={self.num_items}, "
            f"feature_dims={self.feature_dims}, embedding_dim={self.embedding_dim}, "
            f"reg_weight={self.reg_weight})"
        )
