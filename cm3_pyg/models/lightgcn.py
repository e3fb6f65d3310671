r"""LightGCN: simplified graph convolution for collaborative filtering (He et al., SIGIR 2020).

Reference followed: MMRec's ``LightGCN`` (github.com/enoche/MMRec, ``src/models/lightgcn.py``):
Xavier-uniform ID embeddings propagated over :math:`D^{-1/2} A D^{-1/2}` of the training
graph, the final embedding is the mean of layers ``0..L``, BPR loss plus ``reg_weight``
times MMRec's ``EmbLoss`` of the batch's *layer-0* (ego) embeddings. Deliberate deviation:
the BPR term is ``-logsigmoid(s+ - s-)`` instead of ``-log(1e-10 + sigmoid(s+ - s-))``
(equal up to the guard, finite everywhere).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Parameter

from cm3_pyg.models._common import embedding_norm_penalty, split_users_items
from cm3_pyg.models.base import Batch, BatchRows, GraphInputs, Recommender, gather_rows
from cm3_pyg.nn import UserItemPropagation
from cm3_pyg.nn.sparse import SparseAdjacency


class LightGCN(Recommender):
    r"""LightGCN on ID embeddings.

    .. math::
        E^{(0)} = [P; Q], \quad E^{(l+1)} = \hat A E^{(l)}, \quad
        E = \frac{1}{L+1} \sum_{l=0}^{L} E^{(l)}

    scored by dot products of the user and item rows of :math:`E`. Loss: BPR on :math:`E`
    plus :math:`\lambda (\lVert P_u \rVert_F + \lVert Q_i \rVert_F + \lVert Q_j \rVert_F)/B`
    on the layer-0 rows of the batch. ID-only: no features, no item graph.

    Args:
        num_users: ``U``.
        num_items: ``I``.
        embedding_dim: ``d``.
        num_layers: propagation layers ``L``.
        reg_weight: :math:`\lambda`.
    """

    name = "lightgcn"
    min_modalities = 0
    uses_item_graph = False

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int = 64,
        num_layers: int = 3,
        reg_weight: float = 1e-4,
    ) -> None:
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.reg_weight = reg_weight
        self.user_embedding = Parameter(torch.empty(num_users, embedding_dim))
        self.item_embedding = Parameter(torch.empty(num_items, embedding_dim))
        self.propagation = UserItemPropagation(num_layers, combine="mean")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.user_embedding)
        torch.nn.init.xavier_uniform_(self.item_embedding)

    def forward(self, ui_adj: SparseAdjacency) -> tuple[Tensor, Tensor]:
        """``(user [U, d], item [I, d])`` after propagation over the normalised ``ui_adj``."""
        x0 = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        h = self.propagation(x0, ui_adj)
        return split_users_items(h, self.num_users)

    def batch_rows(self, inputs: GraphInputs, batch: Batch) -> BatchRows:
        user_emb, item_emb = self(inputs.ui_adj)
        return BatchRows.gather(user_emb, item_emb, batch)

    def regularization(self, batch: Batch, rows: BatchRows) -> Tensor:
        """``reg_weight`` times MMRec's ``EmbLoss`` of the batch's layer-0 rows."""
        ego = self.item_embedding
        return self.reg_weight * embedding_norm_penalty(
            self.user_embedding.index_select(0, batch.users),
            ego.index_select(0, batch.pos_items),
            gather_rows(ego, batch.neg_items),
        )

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        return self(inputs.ui_adj)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_users={self.num_users}, num_items={self.num_items}, "
            f"embedding_dim={self.embedding_dim}, num_layers={self.propagation.num_layers}, "
            f"reg_weight={self.reg_weight})"
        )
