r"""BM3: bootstrap latent representations for multimodal recommendation (Zhou et al., WWW 2023).

Reference followed: github.com/enoche/BM3 (``src/models/bm3.py``, the same code as MMRec's
``BM3``) and section 3 of the CM3 spec:

* LightGCN backbone on free ID embeddings (mean of layers ``0..n_layers``) with an item ID
  residual: items are :math:`\bar q_i + e_i`;
* one linear encoder per modality to ``embedding_size`` and one shared linear predictor;
* targets are stop-gradient copies perturbed by dropout (``dropout``), no negatives:
  :math:`\mathcal{L} = \mathcal{L}_{rec} + \lambda_{cl} (\mathcal{L}_{inter} +
  \mathcal{L}_{intra}) + \lambda_{reg} \mathcal{L}_{reg}`, every term ``1 - mean cosine``;
* :math:`\mathcal{L}_{reg}` is MMRec's ``EmbLoss`` of the *whole* user and item output
  tables, :math:`(\lVert U \rVert_F + \lVert Q \rVert_F) / I`, exactly as the reference;
* scores are dot products of the predictor's outputs; raw features are fine-tuned
  (trainable copies), Xavier-normal encoder/predictor weights.

Deliberate deviations: any number ``M >= 1`` of modalities (the reference: image and/or
text; each modality adds its inter and intra term); the trainable feature copies are
zero-initialised offsets on the frozen features (same trajectory with Adam, see
``finetune_features``); the target dropout is applied only in training mode (the reference
always applies it inside ``calculate_loss``), so :meth:`BM3.training_loss` in eval mode is the
deterministic, unperturbed loss; the predictor, encoders and target dropout are applied to
the batch's rows only (the reference maps every row, then indexes: the same values, except
that an item repeated within a batch draws independent dropout masks here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Linear, ModuleList, Parameter

from cm3_pyg.checks import Range
from cm3_pyg.models._common import FeatureOffsets, embedding_norm_penalty, split_users_items
from cm3_pyg.models.base import Batch, GraphInputs, LossTerms, Recommender
from cm3_pyg.nn import UserItemPropagation
from cm3_pyg.nn.precision import reduced_linear
from cm3_pyg.nn.sparse import SparseAdjacency


class BM3Losses(NamedTuple):
    """The parts of BM3's loss of one batch (each a scalar)."""

    rec: Tensor
    inter: Tensor
    intra: Tensor
    reg: Tensor


def _one_minus_cos(x: Tensor, y: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(x, y, dim=-1).mean()


class BM3(Recommender):
    r"""BM3 over ``M >= 1`` modalities.

    Online representations :math:`[U; Q] = \mathrm{mean}_{l} \hat A^{l} [P; E]`,
    :math:`Q \leftarrow Q + E`, and :math:`f_m = W_m x_m + b_m`. With the predictor
    :math:`g`, dropout :math:`\delta` and stop-gradient :math:`\mathrm{sg}`, for a batch of
    interactions :math:`(u, i)`:

    .. math::
        \mathcal{L}_{rec} = 1 - \cos(g(u), \mathrm{sg}\,\delta(i))
            + 1 - \cos(g(i), \mathrm{sg}\,\delta(u)), \\
        \mathcal{L}_{inter} = \sum_m 1 - \cos(g(f_{m,i}), \mathrm{sg}\,\delta(i)), \quad
        \mathcal{L}_{intra} = \sum_m 1 - \cos(g(f_{m,i}), \mathrm{sg}\,\delta(f_{m,i}))

    (each cosine averaged over the batch). Scores: :math:`g(u)^\top g(i)`.

    Args:
        num_users: ``U``.
        num_items: ``I``.
        feature_dims: ``[d_1, ..., d_M]``.
        embedding_dim: ``d``.
        num_layers: LightGCN layers.
        dropout: dropout rate of the targets.
        reg_weight: :math:`\lambda_{reg}`.
        cl_weight: :math:`\lambda_{cl}`.
        finetune_features: train per-item corrections of the raw features (the reference
            fine-tunes them); ``False`` keeps them frozen.
    """

    name = "bm3"
    hyperparameter_ranges: ClassVar[dict[str, Range]] = {
        "dropout": Range(0, 1, exclusive_maximum=True),
        "cl_weight": Range(0),
    }
    min_modalities = 1
    uses_item_graph = False
    objectives = ()
    own_objective = "bootstrapped latent views, no negatives"

    def __init__(
        self,
        num_users: int,
        num_items: int,
        feature_dims: Sequence[int],
        embedding_dim: int = 64,
        num_layers: int = 1,
        dropout: float = 0.5,
        reg_weight: float = 0.1,
        cl_weight: float = 2.0,
        finetune_features: bool = True,
    ) -> None:
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.feature_dims = self.check_feature_dims(feature_dims)
        self.num_modalities = len(self.feature_dims)
        self.embedding_dim = embedding_dim
        self.dropout = dropout
        self.reg_weight = reg_weight
        self.cl_weight = cl_weight
        self.user_embedding = Parameter(torch.empty(num_users, embedding_dim))
        self.item_embedding = Parameter(torch.empty(num_items, embedding_dim))
        self.encoders = ModuleList(Linear(d, embedding_dim) for d in self.feature_dims)
        self.predictor = Linear(embedding_dim, embedding_dim)
        self.feature_offsets = FeatureOffsets(num_items, self.feature_dims, finetune_features)
        self.propagation = UserItemPropagation(num_layers, combine="mean")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.user_embedding)
        torch.nn.init.xavier_uniform_(self.item_embedding)
        for layer in (*self.encoders, self.predictor):
            layer.reset_parameters()  # PyTorch's default bias, as the reference
            torch.nn.init.xavier_normal_(layer.weight)
        self.feature_offsets.reset_parameters()

    def forward(self, ui_adj: SparseAdjacency) -> tuple[Tensor, Tensor]:
        """Online ``(user [U, d], item [I, d])`` before the predictor."""
        x0 = torch.cat([self.user_embedding, self.item_embedding], dim=0)
        h = self.propagation(x0, ui_adj)
        user, item = split_users_items(h, self.num_users)
        return user, item + self.item_embedding

    def modality_embeddings(self, features: Sequence[Tensor], items: Tensor) -> list[Tensor]:
        """``M`` tensors ``[B, d]``: the encoded (fine-tuned) features of ``items``."""
        if len(features) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} feature tensors, got {len(features)}")
        return [
            reduced_linear(self.feature_offsets(m, x, items), encoder.weight, encoder.bias)
            for m, (encoder, x) in enumerate(zip(self.encoders, features, strict=True))
        ]

    def _target(self, x: Tensor) -> Tensor:
        return F.dropout(x.detach(), self.dropout, training=self.training)

    def losses(
        self, out: tuple[Tensor, Tensor], features: Sequence[Tensor], users: Tensor, items: Tensor
    ) -> BM3Losses:
        """The loss parts of a batch of ``[B]`` interactions ``(users, items)``."""
        user_all, item_all = out
        u, i = user_all.index_select(0, users), item_all.index_select(0, items)
        u_target, i_target = self._target(u), self._target(i)
        rec = _one_minus_cos(self.predictor(u), i_target) + _one_minus_cos(
            self.predictor(i), u_target
        )
        inter = intra = u.new_zeros(())
        for f in self.modality_embeddings(features, items):
            online = self.predictor(f)
            inter = inter + _one_minus_cos(online, i_target)
            intra = intra + _one_minus_cos(online, self._target(f))
        return BM3Losses(rec, inter, intra, embedding_norm_penalty(user_all, item_all))

    def loss(
        self, out: tuple[Tensor, Tensor], features: Sequence[Tensor], users: Tensor, items: Tensor
    ) -> Tensor:
        """BM3's loss of one batch (see the class docstring)."""
        return self._terms(self.losses(out, features, users, items)).total

    def _terms(self, parts: BM3Losses) -> LossTerms:
        return LossTerms(
            ranking=parts.rec,
            auxiliary={"contrastive": self.cl_weight * (parts.inter + parts.intra)},
            regularization=self.reg_weight * parts.reg,
        )

    def loss_terms(self, inputs: GraphInputs, batch: Batch) -> LossTerms:
        r"""BM3 needs no negatives: ``batch.neg_items`` is ignored. ``ranking`` is
        :math:`\mathcal{L}_{rec}`, the auxiliary term the weighted inter + intra losses."""
        parts = self.losses(self(inputs.ui_adj), inputs.features, batch.users, batch.pos_items)
        return self._terms(parts)

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        user, item = self(inputs.ui_adj)
        return self.predictor(user), self.predictor(item)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_users={self.num_users}, num_items={self.num_items}, "
            f"feature_dims={self.feature_dims}, embedding_dim={self.embedding_dim}, "
            f"num_layers={self.propagation.num_layers}, dropout={self.dropout}, "
            f"reg_weight={self.reg_weight}, cl_weight={self.cl_weight}, "
            f"finetune_features={self.feature_offsets.enabled})"
        )
