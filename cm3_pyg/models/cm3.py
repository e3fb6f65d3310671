r"""CM3: Calibrating Multimodal Recommendation (Zhou, Wang, Shen, 2025)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor
from torch.nn import LeakyReLU, Linear, ModuleList, Parameter, Sequential

from cm3_pyg.checks import Range
from cm3_pyg.models._common import split_users_items
from cm3_pyg.models.base import Batch, GraphInputs, LossTerms, Recommender
from cm3_pyg.nn import (
    ClampedCosineSimilarity,
    SphericalBezierFusion,
    UserItemPropagation,
    alignment_loss,
    calibrated_uniformity_loss,
    feature_linear,
    normalize_rows,
    normalized_concat,
    propagate_item_graph,
    uniformity_loss,
)
from cm3_pyg.nn.sparse import SparseAdjacency


class CM3Output(NamedTuple):
    """One forward pass of :class:`CM3`.

    Attributes:
        user: ``[U, (M+1) d]`` user representations (channel-weighted); ``[B, (M+1) d]`` when
            the forward was given ``users``.
        item: ``[I, (M+1) d]`` item representations.
        fused: ``[I, d]`` spherical-Bezier fusion of the projected modality features
            (unit rows); its cosine similarities calibrate the item uniformity.
    """

    user: Tensor
    item: Tensor
    fused: Tensor


class CM3(Recommender):
    r"""CM3 over ``M >= 1`` item modalities, ``M + 1`` channels.

    Items: one channel per modality, :math:`z_m = W_{2,m}\,\mathrm{LeakyReLU}(W_{1,m} x_m)`
    (:math:`d_m \to 4d \to d`), plus one fused channel, the spherical Bezier curve
    (:class:`~cm3_pyg.nn.SphericalBezierFusion`) through the normalised linear projections
    :math:`p_m = \mathrm{normalize}(P_m x_m)`. Users own a free embedding per channel and a
    softmax weighting :math:`\mathrm{softmax}(\theta_u)` over channels.

    Node input is the concatenation over channels of the row-normalised
    ``[user part; item part]``; it is propagated over the normalised user-item graph for
    ``num_ui_layers`` layers (sum of layers), after which items take one item-graph step
    :math:`h_i \leftarrow h_i + S^{n} h_i`. The score of ``(u, i)`` is the dot product of
    the two ``(M+1) d`` vectors.

    Loss on a batch of users :math:`u`, positives :math:`i`, negatives :math:`j` (all
    vectors L2-normalised):
    :math:`\mathcal{L} = \mathcal{L}_{\mathrm{align}}(u, i)
    + \gamma\,(\mathcal{L}_{\mathrm{unif}}(u)
    + \mathcal{L}_{\mathrm{cu}}(j; s)) / 2` with
    :math:`s_{ab} = \mathrm{clamp}(\cos(m_a, m_b), s_{\min}, s_{\max})` over the fused
    features of the negatives.

    Differences from the reference code, on purpose: evaluation runs a fresh forward in
    eval mode (fusion at :math:`t = 0.5`) instead of reusing the last training batch's
    embeddings; no unused trainable copies of the feature tables; weight decay, when
    configured, is honoured by the trainer.

    Args:
        num_users: ``U``.
        num_items: ``I``.
        feature_dims: ``[d_1, ..., d_M]``, the raw feature size of each modality.
        embedding_dim: ``d`` per channel.
        num_ui_layers: user-item propagation layers.
        num_mm_layers: item-graph layers ``n``.
        alpha: Beta(alpha, alpha) concentration of the fusion's interpolation parameter.
        gamma: weight of the uniformity terms.
        min_sim: lower clamp of the multimodal similarity.
        max_sim: upper clamp of the multimodal similarity.
        temperature: ``t`` of the uniformity losses.
    """

    name = "cm3"
    hyperparameter_ranges: ClassVar[dict[str, Range]] = {
        "alpha": Range(0, exclusive_minimum=True),
        "gamma": Range(0),
        "min_sim": Range(-1, 1),
        "max_sim": Range(-1, 1),
        "temperature": Range(0, exclusive_minimum=True),
    }
    min_modalities = 1
    uses_item_graph = True
    row_local_features = True  # its encoders read the features, through feature_linear only
    id_rows = {"user_embedding": ("user", 1), "user_channel_logits": ("user", 0)}
    objectives = ()
    own_objective = "alignment + calibrated uniformity"

    @classmethod
    def check_relations(cls, values: Mapping[str, Any], label: Callable[[str], str]) -> None:
        """``min_sim <= max_sim`` (the calibration's clamp)."""
        defaults = cls.hyperparameters()
        low = values.get("min_sim", defaults["min_sim"])
        high = values.get("max_sim", defaults["max_sim"])
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"{label('min_sim')} ({low}) must not exceed {label('max_sim')} ({high})"
            )

    def __init__(
        self,
        num_users: int,
        num_items: int,
        feature_dims: Sequence[int],
        embedding_dim: int = 64,
        num_ui_layers: int = 3,
        num_mm_layers: int = 1,
        alpha: float = 0.5,
        gamma: float = 0.9,
        min_sim: float = 0.0,
        max_sim: float = 1.0,
        temperature: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.feature_dims = self.check_feature_dims(feature_dims)
        self.num_modalities = len(self.feature_dims)
        self.num_channels = self.num_modalities + 1
        self.embedding_dim = embedding_dim
        self.num_mm_layers = num_mm_layers
        self.gamma = gamma
        self.min_sim = min_sim
        self.max_sim = max_sim
        self.temperature = temperature

        d = embedding_dim
        self.encoders = ModuleList(
            Sequential(Linear(dm, 4 * d), LeakyReLU(), Linear(4 * d, d, bias=False))
            for dm in self.feature_dims
        )
        self.projections = ModuleList(Linear(dm, d) for dm in self.feature_dims)
        self.fusion = SphericalBezierFusion(self.num_modalities, alpha)
        self.user_embedding = Parameter(torch.empty(self.num_channels, num_users, d))
        self.user_channel_logits = Parameter(torch.empty(num_users, self.num_channels))
        self.propagation = UserItemPropagation(num_ui_layers, combine="sum")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for encoder in self.encoders:
            for layer in encoder:
                if isinstance(layer, Linear):
                    layer.reset_parameters()
        for proj in self.projections:
            proj.reset_parameters()
            torch.nn.init.xavier_normal_(proj.weight)
        # Xavier-normal with the fans of a [U, d] (and [U, M+1]) matrix, as the reference.
        u = self.num_users
        torch.nn.init.normal_(self.user_embedding, std=(2.0 / (u + self.embedding_dim)) ** 0.5)
        torch.nn.init.normal_(self.user_channel_logits, std=(2.0 / (u + self.num_channels)) ** 0.5)

    def forward(
        self,
        features: Sequence[Tensor],
        ui_adj: SparseAdjacency,
        item_adj: SparseAdjacency | None = None,
        t: Tensor | None = None,
        users: Tensor | None = None,
    ) -> CM3Output:
        """Full-graph forward.

        Args:
            features: ``M`` tensors ``[I, d_m]``.
            ui_adj: normalised ``[U + I, U + I]`` sparse adjacency (users first).
            item_adj: normalised ``[I, I]`` item graph or ``None`` to skip that step.
            t: optional ``[I, 1]`` fusion parameter (default: random in training, 0.5 in eval).
            users: optional ``[B]`` user ids: ``user`` then holds only these users' rows, in
                this order (the same values as those rows of the full table, without
                weighting every user's channels).
        """
        if len(features) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} feature tensors, got {len(features)}")
        item_channels, projected = [], []
        for encoder, proj, x in zip(self.encoders, self.projections, features, strict=True):
            first, activation, second = encoder
            # The encoder's first layer and the fusion projection read the same features:
            # one GEMM over the stacked weights reads [I, d_m] once (same values as two).
            both = feature_linear(
                x, torch.cat([first.weight, proj.weight]), torch.cat([first.bias, proj.bias])
            )
            hidden, p = both.split([first.out_features, proj.out_features], dim=-1)
            item_channels.append(second(activation(hidden)))
            projected.append(p)
        fused = self.fusion(projected, t=t)
        item_channels.append(fused)
        # unbind: one backward node that stacks the channels' gradients; indexing each
        # channel would zero-fill a full [C, U, d] gradient per channel and add them up.
        user_channels = self.user_embedding.unbind(0)
        # Per channel, the row-normalised [users; items], written straight into [N, C d].
        x0 = normalized_concat(
            [[user, item] for user, item in zip(user_channels, item_channels, strict=True)]
        )
        logits = self.user_channel_logits
        if users is None:
            user_h, item_h = split_users_items(self.propagation(x0, ui_adj), self.num_users)
        else:
            # Only these users' rows: the last layer skips the other users.
            user_h, item_h = self.propagation.forward_rows(x0, ui_adj, self.num_users, users)
            logits = logits.index_select(0, users)
        weights = torch.softmax(logits, dim=-1).unsqueeze(-1)
        user = (user_h.view(user_h.size(0), self.num_channels, -1) * weights).flatten(1)
        if item_adj is not None:
            item_h = propagate_item_graph(item_h, item_adj, self.num_mm_layers)
        return CM3Output(user=user, item=item_h, fused=fused)

    def loss(self, out: CM3Output, users: Tensor, pos_items: Tensor, neg_items: Tensor) -> Tensor:
        """CM3's loss of one batch (see the class docstring); inputs are ``[B]`` index tensors.

        ``out`` is a full forward (``out.user`` holds every user). The pairwise terms see each
        distinct user / negative item once, weighted by how often it occurs in the batch: the
        same value and gradient as the ``B x B`` pairs of repeated rows, on a smaller matrix.
        """
        users_unique, users_inverse, users_count = torch.unique(
            users, return_inverse=True, return_counts=True
        )
        user_rows = out.user.index_select(0, users_unique)
        return self._batch_terms(
            user_rows, users_inverse, users_count, out.item, out.fused, pos_items, neg_items
        ).total

    def _batch_terms(
        self,
        user_rows: Tensor,
        users_inverse: Tensor,
        users_count: Tensor,
        item: Tensor,
        fused: Tensor,
        pos_items: Tensor,
        neg_items: Tensor,
    ) -> LossTerms:
        """The loss terms from the batch's distinct users' rows ``[B', (M+1) d]`` (``torch.unique``
        order), their inverse map and counts, and the full item tables."""
        u_unique = normalize_rows(user_rows)
        u = u_unique.index_select(0, users_inverse)
        neg_unique, neg_count = torch.unique(neg_items, return_counts=True)
        # One gather of the positives' and the negatives' rows: one gradient scatter into
        # the [I, (M+1) d] table instead of two zero-filled tables added together.
        i, j = normalize_rows(item.index_select(0, torch.cat([pos_items, neg_unique]))).split(
            [pos_items.numel(), neg_unique.numel()]
        )
        sim = ClampedCosineSimilarity(fused.index_select(0, neg_unique), self.min_sim, self.max_sim)
        uniform = uniformity_loss(
            u_unique, self.temperature, counts=users_count
        ) + calibrated_uniformity_loss(j, sim, self.temperature, counts=neg_count)
        return LossTerms(
            ranking=alignment_loss(u, i), auxiliary={"uniformity": self.gamma * uniform / 2}
        )

    def loss_terms(self, inputs: GraphInputs, batch: Batch) -> LossTerms:
        """``ranking`` is the alignment, the auxiliary term the weighted uniformity pair.

        Only the batch's distinct users are weighted (same values as :meth:`loss` on a full
        forward, tested).
        """
        users_unique, users_inverse, users_count = torch.unique(
            batch.users, return_inverse=True, return_counts=True
        )
        out = self(inputs.features, inputs.ui_adj, inputs.item_adj, users=users_unique)
        return self._batch_terms(
            out.user,
            users_inverse,
            users_count,
            out.item,
            out.fused,
            batch.pos_items,
            batch.neg_items,
        )

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        out = self(inputs.features, inputs.ui_adj, inputs.item_adj)
        return out.user, out.item

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_users={self.num_users}, num_items={self.num_items}, "
            f"feature_dims={self.feature_dims}, embedding_dim={self.embedding_dim}, "
            f"num_ui_layers={self.propagation.num_layers}, num_mm_layers={self.num_mm_layers}, "
            f"alpha={self.fusion.alpha}, gamma={self.gamma}, min_sim={self.min_sim}, "
            f"max_sim={self.max_sim}, temperature={self.temperature})"
        )
