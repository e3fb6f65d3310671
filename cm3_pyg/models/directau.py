r"""DirectAU: alignment and uniformity as the collaborative-filtering objective.

Wang, Yu, Ma, Zhang, Liu, Ma: "Towards Representation Alignment and Uniformity in
Collaborative Filtering" (KDD 2022). The loss CM3 calibrates, on ID embeddings alone: an ID
encoder (matrix factorisation, or LightGCN with ``num_layers > 0``) trained with

.. math::
    \mathcal{L} = \mathcal{L}_{\mathrm{align}}(\tilde u, \tilde i)
    + \frac{\gamma}{2} \big(\mathcal{L}_{\mathrm{unif}}(\tilde u)
    + \mathcal{L}_{\mathrm{unif}}(\tilde i)\big)

on the L2-normalised rows :math:`\tilde u, \tilde i` of a batch of interactions, with
:math:`\mathcal{L}_{\mathrm{unif}}(X) = \log \mathrm{mean}_{a<b} e^{-t \|x_a - x_b\|^2}`
(:math:`t = 2`). No negatives are sampled; scores are dot products of the raw embeddings,
as the paper's code ranks.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import Parameter

from cm3_pyg.checks import Range
from cm3_pyg.models._common import split_users_items
from cm3_pyg.models.base import Batch, GraphInputs, LossTerms, Recommender
from cm3_pyg.nn import UserItemPropagation, alignment_loss, normalize_rows, uniformity_loss


class DirectAU(Recommender):
    r"""DirectAU on ID embeddings (see the module docstring).

    Args:
        num_users: ``U``.
        num_items: ``I``.
        embedding_dim: ``d``.
        num_layers: LightGCN layers of the encoder (mean of layers ``0..L``); ``0`` is MF.
        gamma: :math:`\gamma`, the weight of the uniformity terms.
        temperature: :math:`t` of the uniformity loss.
    """

    name = "directau"
    hyperparameter_ranges: ClassVar[dict[str, Range]] = {
        "gamma": Range(0),
        "temperature": Range(0, exclusive_minimum=True),
    }
    objectives = ()
    own_objective = "alignment + uniformity of the batch's users and items"

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int = 64,
        num_layers: int = 0,
        gamma: float = 1.0,
        temperature: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.gamma = gamma
        self.temperature = temperature
        self.user_embedding = Parameter(torch.empty(num_users, embedding_dim))
        self.item_embedding = Parameter(torch.empty(num_items, embedding_dim))
        self.propagation = UserItemPropagation(num_layers, combine="mean")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_normal_(self.user_embedding)
        torch.nn.init.xavier_normal_(self.item_embedding)

    def forward(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        """``(user [U, d], item [I, d])``: the ID tables, propagated if ``num_layers > 0``."""
        if self.propagation.num_layers == 0:
            return self.user_embedding, self.item_embedding
        x0 = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        return split_users_items(self.propagation(x0, inputs.ui_adj), self.num_users)

    def loss_terms(self, inputs: GraphInputs, batch: Batch) -> LossTerms:
        """``ranking`` is the alignment, the auxiliary term the weighted uniformity."""
        user_emb, item_emb = self(inputs)
        u = normalize_rows(user_emb.index_select(0, batch.users))
        i = normalize_rows(item_emb.index_select(0, batch.pos_items))
        t = self.temperature
        uniform = (uniformity_loss(u, t) + uniformity_loss(i, t)) / 2
        return LossTerms(
            ranking=alignment_loss(u, i), auxiliary={"uniformity": self.gamma * uniform}
        )

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        return self(inputs)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_users={self.num_users}, num_items={self.num_items}, "
            f"embedding_dim={self.embedding_dim}, num_layers={self.propagation.num_layers}, "
            f"gamma={self.gamma}, temperature={self.temperature})"
        )
