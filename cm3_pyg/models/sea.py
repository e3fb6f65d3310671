r"""SEA: separate learning of modality-generic and -unique parts (arXiv 2406.08270).

"It is Never Too Late to Mend: Separate Learning for Multimedia Recommendation". Reference
followed: github.com/bruno686/SEA (``src/models/SEA.py``, ``src/common/trainer.py``,
``src/main.py`` defaults, ``src/configs/model/SEA.yaml``) and section 3 of the CM3 spec.

* Per modality ``m`` a linear layer :math:`r_m = R_m x_m` (:math:`d_m \to d_m`, the
  reference's ``t_item_linear`` 384 -> 384 and ``v_item_linear`` 4096 -> 4096 on Baby) whose
  output is split into a **generic** half :math:`g_m = r_m[:h_m]` and a **unique** half
  :math:`\upsilon_m = r_m[h_m:]`, :math:`h_m = \lfloor d_m / 2 \rfloor`.
* A GCN per modality: a free user preference :math:`P_m` (``d``) and an item MLP
  :math:`f_m(r_m) = W_2\,\mathrm{LeakyReLU}(W_1 r_m + b_1) + b_2` (:math:`d_m \to 4d \to d`),
  row-normalised ``[P_m; f_m(r_m)]`` propagated over the normalised user-item graph, SUM of
  layers ``0..n_layers`` (2). Users weight the modalities with a free per-user vector
  (initialised to a softmax, then trained freely); items concatenate them and take the frozen
  modality kNN graph step :math:`h_i \leftarrow h_i + S^{n} h_i`. Scores: dot products.
* **Solosimloss** (InfoNCE over ALL items, temperature ``temp`` = 0.2): a projection head per
  modality (Linear-BN-ReLU-Linear-BN-ReLU-Linear to ``proj_out_dim``, unit rows) on the generic
  half; for every pair of modalities :math:`a < b`,
  :math:`-\frac{1}{I}\sum_i \log \mathrm{softmax}_j(\langle p_{b,i}, p_{a,j}\rangle/\tau)_i`
  (with ``[image, text]`` exactly the reference's ``Solosimloss(text, image)``), averaged over
  pairs.
* **CLUB** upper bound of :math:`I(g_m; \upsilon_m)`: two linear maps to ``club_dim`` (32),
  :math:`a_m = T_m g_m`, :math:`b_m = T'_m \upsilon_m`, and ONE variational network
  :math:`q(b \mid a) = \mathcal{N}(\mu(a), \mathrm{diag}\, e^{\log\sigma^2(a)})` shared by the
  modalities (:class:`CLUB`); the bound
  :math:`\max(0, \frac{1}{2}\,\mathrm{mean}_i[\log q(b_i|a_i) - \log q(b_{\pi(i)}|a_i)])`
  with a random permutation :math:`\pi` of the items.
* Loss: :math:`\mathrm{BPR}_2 + \frac{\mathrm{ureg}}{M} \sum_m \mathrm{CLUB}_m +
  \mathrm{alpha\_contrast} \cdot \mathrm{Solosim}`, where :math:`\mathrm{BPR}_2` uses
  :math:`\log_2` as the reference (:math:`-\mathrm{mean} \log_2 \sigma(s^+ - s^-)`, i.e. the
  usual BPR divided by :math:`\ln 2`). No embedding penalty (the reference has none).

**The CLUB network is fitted by its own optimiser, not the outer one.** The reference's
trainer, after every batch's backward pass, takes ``50`` Adam steps (learning rate =
``learning_rate``) on the network's negative log-likelihood of the batch's detached samples,
then steps the model. Here the network is a submodule (:attr:`SEA.club`; ``.to()``,
``state_dict()`` and checkpoints see it) declared as an
:class:`~cm3_pyg.models.base.InnerProblem`: the trainer keeps it out of the outer optimiser,
and after each batch's loss takes ``club_steps`` steps of its own Adam on
:meth:`SEA.inner_loss` of the batch's detached pairs (``LossTerms.inner_inputs["club"]``),
then steps the model. The bound in the outer loss is evaluated with a detached copy of the
network's weights (gradients reach the model only), which is also what the reference
effectively does (its inner loop zeroes the club's gradients from the outer pass).

**Which pairs the CLUB network is fitted on** (``club_pairing``). The loss evaluates the
bound within each modality, on ``(a_m, b_m)`` (generic and unique part of modality ``m``).
The default, ``"within"``, fits the network on those same pairs, which is what makes it a
variational upper bound of the mutual information it is used for. The reference's trainer
fits it on cross-modal pairs instead: text-generic -> image-generic and text-unique ->
image-unique. ``"cross"`` reproduces that: for consecutive modalities ``m, m + 1`` (the
order of the data's feature tables) the pairs ``(a_{m+1}, a_m)`` and ``(b_{m+1}, b_m)``,
``2 (M - 1)`` pairs in all, which for the two modalities ``[image, text]`` are exactly the
reference's. Only what the network is fitted on changes; the loss is the same.

Deliberate deviations: any number ``M >= 2`` of modalities (the reference: image + text);
the CLUB pairing above (``"within"`` by default, the reference's as ``"cross"``);
the inner loop's row shuffles are dropped (the loss is a mean over rows);
``d_m -> d_m`` replaces the Baby-specific fixed sizes; evaluation is a fresh forward pass in
eval mode (the reference scores with the last training batch's embeddings); the reference's
unused layers, its unused item-dropping graphs and trainable feature copies are omitted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import (
    BatchNorm1d,
    LeakyReLU,
    Linear,
    ModuleList,
    Parameter,
    ReLU,
    Sequential,
    Tanh,
)

from cm3_pyg.checks import Range
from cm3_pyg.models._common import split_users_items
from cm3_pyg.models.base import (
    Batch,
    BatchRows,
    GraphInputs,
    InnerProblem,
    LossTerms,
    Recommender,
    gather_rows,
)
from cm3_pyg.nn import (
    UserItemPropagation,
    feature_linear,
    gaussian_nll,
    info_nce_loss,
    normalize_rows,
    propagate_item_graph,
)
from cm3_pyg.nn.sparse import SparseAdjacency


def solosim_loss(anchor: Tensor, other: Tensor, temperature: float) -> Tensor:
    r"""SEA's Solosimloss: InfoNCE from ``anchor`` rows to ``other`` rows (cosine logits).

    :math:`-\frac{1}{N}\sum_i \log \frac{\exp(\cos(a_i, o_i)/\tau)}
    {\sum_j \exp(\cos(a_i, o_j)/\tau)}`; row ``i`` of both is the same item.
    """
    return info_nce_loss(normalize_rows(anchor), normalize_rows(other), temperature)


def _mean_weights(rows: Tensor) -> Tensor:
    """``[N]`` weights ``1/N``: a row-weighted sum with them is the mean over ``rows``."""
    return rows.new_full((rows.size(0),), 1.0 / max(rows.size(0), 1))


class CLUB(torch.nn.Module):
    r"""Sampled CLUB estimator (Cheng et al., 2020) of :math:`I(x; y)`.

    A Gaussian :math:`q(y \mid x)` with mean :math:`\mu(x)` and log-variance
    :math:`\log\sigma^2(x) = \tanh(\cdot)`, each a two-layer ReLU network of
    ``hidden_size // 2`` units.

    Args:
        x_dim: size of ``x``.
        y_dim: size of ``y``.
        hidden_size: twice the hidden width (the reference's convention).
    """

    def __init__(self, x_dim: int, y_dim: int, hidden_size: int) -> None:
        super().__init__()
        hidden = max(hidden_size // 2, 1)
        self.mu = Sequential(Linear(x_dim, hidden), ReLU(), Linear(hidden, y_dim))
        self.logvar = Sequential(Linear(x_dim, hidden), ReLU(), Linear(hidden, y_dim), Tanh())

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        r""":math:`\frac{1}{N}\sum_i \log q(y_i \mid x_i)` up to the constant."""
        return -self.learning_loss(x, y)

    def learning_loss(self, x: Tensor, y: Tensor, row_weight: Tensor | None = None) -> Tensor:
        r"""What the inner optimizer minimises: the negative log-likelihood
        :math:`\sum_i w_i \sum_j \tfrac12\big[(\mu_{ij} - y_{ij})^2 e^{-\log\sigma^2_{ij}}
        + \log\sigma^2_{ij}\big]`, with :math:`w_i = 1/N` unless ``row_weight`` (``[N]``) is
        given; several pairs stacked row-wise with weights :math:`1/N_m` give the sum of their
        means in one pass."""
        if row_weight is None:
            row_weight = _mean_weights(x)
        return gaussian_nll(self.mu(x), self.logvar(x), y, row_weight)

    def forward(self, x: Tensor, y: Tensor, perm: Tensor) -> Tensor:
        r"""The bound :math:`\max(0, \frac{1}{2}\mathrm{mean}_i[\log q(y_i|x_i) -
        \log q(y_{\pi(i)}|x_i)])` with the permutation ``perm`` (:math:`\pi`)."""
        mu, logvar = self.mu(x), self.logvar(x)
        inv_var = (-logvar).exp()
        positive = -(mu - y).pow(2) * inv_var / 2.0
        negative = -(mu - y[perm]).pow(2) * inv_var / 2.0
        return torch.clamp((positive - negative).sum(1).mean() / 2.0, min=0.0)


class SEAOutput(NamedTuple):
    """One forward pass of :class:`SEA`.

    Attributes:
        user: ``[U, M d]`` user embeddings (modality-weighted).
        item: ``[I, M d]`` item embeddings.
        generic: ``M`` tensors ``[I, h_m]``, the generic halves (empty when ``folded``).
        unique: ``M`` tensors ``[I, d_m - h_m]``, the unique halves (empty when ``folded``).
        club_inputs: with ``folded``: per modality the CLUB maps' outputs ``(a_m, b_m)``.
        head_hidden: with ``folded``: per modality the projection head's first layer output.
    """

    user: Tensor
    item: Tensor
    generic: list[Tensor]
    unique: list[Tensor]
    club_inputs: list[tuple[Tensor, Tensor]] | None = None
    head_hidden: list[Tensor] | None = None


def cross_modal_pairs(
    samples: Sequence[tuple[Tensor, Tensor]],
) -> list[tuple[Tensor, Tensor]]:
    """The reference's CLUB fitting pairs from per-modality ``(a_m, b_m)``: for consecutive
    modalities, ``(a_{m+1}, a_m)`` (generic parts) and ``(b_{m+1}, b_m)`` (unique parts)."""
    pairs = []
    for (a_m, b_m), (a_next, b_next) in itertools.pairwise(samples):
        pairs += [(a_next, a_m), (b_next, b_m)]
    return pairs


class SEALosses(NamedTuple):
    """The parts of SEA's loss of one batch (scalars) and the pairs the CLUB network is
    fitted on (``club_pairing``: ``(a_m, b_m)`` per modality, or :func:`cross_modal_pairs`)."""

    bpr: Tensor
    mi: Tensor
    align: Tensor
    club_samples: list[tuple[Tensor, Tensor]]


class SEA(Recommender):
    r"""SEA over ``M >= 2`` item modalities (see the module docstring).

    Args:
        num_users: ``U``.
        num_items: ``I``.
        feature_dims: ``[d_1, ..., d_M]`` (each ``>= 2``).
        embedding_dim: ``d`` per modality.
        num_layers: GCN layers (sum of layers ``0..L``).
        num_mm_layers: item-graph steps ``n``.
        temperature: Solosimloss :math:`\tau`.
        alpha_contrast: weight of the Solosimloss.
        ureg: weight of the CLUB bounds.
        proj_hidden_dim: hidden width of the projection heads.
        proj_out_dim: output width of the projection heads.
        club_dim: width of the CLUB samples ``a_m, b_m``.
        club_hidden_size: CLUB's ``hidden_size`` (its layers have half of it).
        club_steps: inner optimizer steps per training batch.
        club_lr: the inner Adam's learning rate (``None``: the run's ``learning_rate``).
        club_pairing: the pairs the CLUB network is fitted on: ``"within"`` each modality
            (the pairs it bounds) or ``"cross"`` (consecutive modalities, the reference's).
    """

    name = "sea"
    hyperparameter_ranges: ClassVar[dict[str, Range]] = {
        "temperature": Range(0, exclusive_minimum=True),
        "alpha_contrast": Range(0),
        "ureg": Range(0),
        "proj_hidden_dim": Range(1),
        "proj_out_dim": Range(1),
        "club_dim": Range(1),
        "club_hidden_size": Range(1),
        "club_steps": Range(0),
        "club_lr": Range(0, exclusive_minimum=True),
    }
    CLUB_PAIRINGS = ("within", "cross")
    hyperparameter_choices: ClassVar[dict[str, tuple[str, ...]]] = {"club_pairing": CLUB_PAIRINGS}
    min_modalities = 2
    uses_item_graph = True
    id_rows = {"user_preference": ("user", 1), "user_modality_weights": ("user", 0)}

    def __init__(
        self,
        num_users: int,
        num_items: int,
        feature_dims: Sequence[int],
        embedding_dim: int = 64,
        num_layers: int = 2,
        num_mm_layers: int = 1,
        temperature: float = 0.2,
        alpha_contrast: float = 0.012,
        ureg: float = 0.006,
        proj_hidden_dim: int = 64,
        proj_out_dim: int = 32,
        club_dim: int = 32,
        club_hidden_size: int = 16,
        club_steps: int = 50,
        club_lr: float | None = None,
        club_pairing: str = "within",
    ) -> None:
        super().__init__()
        feature_dims = self.check_feature_dims(feature_dims)  # Solosim pairs the modalities
        if min(feature_dims) < 2:
            raise ValueError(
                "SEA splits each feature in halves: every d_m must be >= 2, "
                f"got {list(feature_dims)}"
            )
        self.num_users = num_users
        self.num_items = num_items
        self.feature_dims = feature_dims
        self.num_modalities = len(self.feature_dims)
        self.generic_dims = [d // 2 for d in self.feature_dims]
        self.embedding_dim = embedding_dim
        self.num_mm_layers = num_mm_layers
        self.temperature = temperature
        self.alpha_contrast = alpha_contrast
        self.ureg = ureg
        self.club_steps = club_steps
        d = embedding_dim
        dims = list(zip(self.feature_dims, self.generic_dims, strict=True))
        self.representations = ModuleList(Linear(dm, dm) for dm in self.feature_dims)
        self.item_mlps = ModuleList(
            Sequential(Linear(dm, 4 * d), LeakyReLU(), Linear(4 * d, d)) for dm in self.feature_dims
        )
        self.user_preference = Parameter(torch.empty(self.num_modalities, num_users, d))
        self.user_modality_weights = Parameter(torch.empty(num_users, self.num_modalities))
        self.projection_heads = ModuleList(
            Sequential(
                Linear(h, proj_hidden_dim),
                BatchNorm1d(proj_hidden_dim),
                ReLU(),
                Linear(proj_hidden_dim, proj_hidden_dim),
                BatchNorm1d(proj_hidden_dim),
                ReLU(),
                Linear(proj_hidden_dim, proj_out_dim),
            )
            for h in self.generic_dims
        )
        self.generic_maps = ModuleList(Linear(h, club_dim) for _, h in dims)
        self.unique_maps = ModuleList(Linear(dm - h, club_dim) for dm, h in dims)
        self.propagation = UserItemPropagation(num_layers, combine="sum")
        self.club_lr = club_lr
        self.club_pairing = club_pairing
        # Fitted by its own optimiser (see inner_problems), not by the outer one.
        self.club = CLUB(club_dim, club_dim, club_hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        club = set(self.club.modules())
        for module in self.modules():
            if module is not self and module not in club and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # PyTorch's defaults, as the reference
        u, m = self.num_users, self.num_modalities
        torch.nn.init.normal_(self.user_preference, std=(2.0 / (u + self.embedding_dim)) ** 0.5)
        with torch.no_grad():  # Xavier-normal of [U, M], then a softmax (reference init)
            weights = (
                torch.randn(u, m, device=self.user_modality_weights.device) * (2.0 / (u + m)) ** 0.5
            )
            self.user_modality_weights.copy_(torch.softmax(weights, dim=1))
        for module in self.club.modules():
            if isinstance(module, Linear):
                module.reset_parameters()

    # --- model ----------------------------------------------------------------------------

    def forward(
        self,
        features: Sequence[Tensor],
        ui_adj: SparseAdjacency,
        item_adj: SparseAdjacency | None = None,
        folded: bool = False,
    ) -> SEAOutput:
        """Full-graph forward; ``item_adj=None`` skips the item-graph step.

        ``folded``: the representation layer :math:`r_m = R_m x_m` is never formed. Every
        reader of :math:`r_m` starts with a linear layer (the item MLP, the projection head,
        the two CLUB maps), so their first layers are applied as one product of ``x_m`` with
        the composed weights :math:`V_k R_m` (the same function, in another order of
        products; on Baby's 4096-d images far fewer FLOPs per step); the output then
        carries ``club_inputs`` and ``head_hidden`` instead of the halves.
        """
        if len(features) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} feature tensors, got {len(features)}")
        users, items, generic, unique = [], [], [], []
        club_inputs, head_hidden = [], []
        for m, x in enumerate(features):
            mlp = self.item_mlps[m]
            if folded:
                hidden, head, a, b = self._folded_first_layers(m, x)
                item_in = mlp[2](mlp[1](hidden))
                club_inputs.append((a, b))
                head_hidden.append(head)
            else:
                r = self.representations[m](x)
                h = self.generic_dims[m]
                generic.append(r[:, :h])
                unique.append(r[:, h:])
                item_in = mlp(r)
            x0 = normalize_rows(torch.cat([self.user_preference[m], item_in], dim=0))
            user_h, item_h = split_users_items(self.propagation(x0, ui_adj), self.num_users)
            users.append(user_h * self.user_modality_weights[:, m : m + 1])
            items.append(item_h)
        item = torch.cat(items, dim=1)
        if item_adj is not None:
            item = propagate_item_graph(item, item_adj, self.num_mm_layers)
        return SEAOutput(
            torch.cat(users, dim=1),
            item,
            generic,
            unique,
            club_inputs if folded else None,
            head_hidden if folded else None,
        )

    def _folded_first_layers(self, m: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(item MLP layer 1, head layer 1, a_m, b_m)`` of :math:`r_m = R_m x_m` without
        forming :math:`r_m`: one product of ``x`` with the stacked composed weights."""
        rep = self.representations[m]
        h = self.generic_dims[m]
        readers = (
            (self.item_mlps[m][0], slice(None)),
            (self.projection_heads[m][0], slice(0, h)),
            (self.generic_maps[m], slice(0, h)),
            (self.unique_maps[m], slice(h, None)),
        )
        weight = torch.cat([layer.weight @ rep.weight[rows] for layer, rows in readers])
        bias = torch.cat([layer.weight @ rep.bias[rows] + layer.bias for layer, rows in readers])
        out = feature_linear(x, weight, bias)
        hidden, head, a, b = out.split([layer.out_features for layer, _ in readers], dim=1)
        return hidden, head, a, b

    def losses(
        self,
        out: SEAOutput,
        users: Tensor,
        pos_items: Tensor,
        neg_items: Tensor,
        perms: Sequence[Tensor] | None = None,
    ) -> SEALosses:
        """The loss parts of a batch.

        Args:
            out: :meth:`forward`'s output.
            users, pos_items, neg_items: ``[B]`` index tensors.
            perms: per modality a permutation of the ``I`` items for the CLUB negatives
                (default: drawn with ``torch.randperm``, one per modality in order).
        """
        u = out.user.index_select(0, users)
        assert self.objective is not None
        bpr = self.objective(
            self.score(u, out.item.index_select(0, pos_items)),
            self.score(u, gather_rows(out.item, neg_items)),
            Batch(users, pos_items, neg_items),
        )
        bpr = bpr / math.log(2.0)  # the reference's log base 2
        # The bound with a frozen copy of the CLUB weights: the inner steps below may update
        # the live weights in place before the outer backward pass.
        frozen = {k: v.detach().clone() for k, v in self.club.named_parameters()}
        mi = out.item.new_zeros(())
        samples = []
        for m in range(self.num_modalities):
            if out.club_inputs is not None:
                a, b = out.club_inputs[m]
            else:
                a = self.generic_maps[m](out.generic[m])
                b = self.unique_maps[m](out.unique[m])
            perm = torch.randperm(a.size(0), device=a.device) if perms is None else perms[m]
            mi = mi + functional_call(self.club, frozen, (a, b, perm))
            samples.append((a, b))
        mi = mi / self.num_modalities
        if self.club_pairing == "cross":
            samples = cross_modal_pairs(samples)
        heads = self.projection_heads
        if out.head_hidden is not None:
            proj = [head[1:](z) for head, z in zip(heads, out.head_hidden, strict=True)]
        else:
            proj = [head(g) for head, g in zip(heads, out.generic, strict=True)]
        pairs = list(itertools.combinations(range(self.num_modalities), 2))
        align = sum(solosim_loss(proj[b], proj[a], self.temperature) for a, b in pairs)
        return SEALosses(bpr, mi, align / len(pairs), samples)

    def loss(self, parts: SEALosses) -> Tensor:
        """:math:`\\mathrm{BPR}_2 + \\mathrm{ureg} \\cdot \\mathrm{mean}_m \\mathrm{CLUB}_m
        + \\mathrm{alpha\\_contrast} \\cdot \\mathrm{Solosim}`."""
        return self._terms(parts).total

    def _terms(self, parts: SEALosses) -> LossTerms:
        return LossTerms(
            ranking=parts.bpr,
            auxiliary={"club": self.ureg * parts.mi, "solosim": self.alpha_contrast * parts.align},
            inner_inputs={"club": [(a.detach(), b.detach()) for a, b in parts.club_samples]},
        )

    def batch_rows(self, inputs: GraphInputs, batch: Batch) -> BatchRows:
        out = self(inputs.features, inputs.ui_adj, self.item_graph(inputs))
        return BatchRows.gather(out.user, out.item, batch, out=out)

    def loss_terms(self, inputs: GraphInputs, batch: Batch) -> LossTerms:
        """``ranking`` is the objective (BPR) on the scores in log base 2, the auxiliary
        terms the weighted CLUB bound and Solosimloss; the CLUB pairs are the inner inputs."""
        # folded: the same values without forming the representation layer (see forward)
        out = self(inputs.features, inputs.ui_adj, self.item_graph(inputs), folded=True)
        parts = self.losses(out, batch.users, batch.pos_items, batch.neg_items)
        return self._terms(parts)

    def inner_problems(self) -> list[InnerProblem]:
        """The CLUB network: ``club_steps`` Adam steps (``club_lr``, default the run's
        learning rate, as the reference) on each batch's detached pairs (``club_pairing``)."""
        return [InnerProblem("club", self.club, self.club_steps, self.club_lr)]

    def inner_loss(self, name: str, data: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """The CLUB network's negative log-likelihood, summed over the pairs' means."""
        if name != "club":
            return super().inner_loss(name, data)
        # All pairs stacked row-wise, each row weighted 1/N_m: one pass computes the sum
        # over pairs of their mean negative log-likelihoods.
        x = torch.cat([a for a, _ in data])
        y = torch.cat([b for _, b in data])
        row_weight = torch.cat([_mean_weights(a) for a, _ in data])
        return self.club.learning_loss(x, y, row_weight)

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        out = self(inputs.features, inputs.ui_adj, self.item_graph(inputs))
        return out.user, out.item

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_users={self.num_users}, num_items={self.num_items}, "
            f"feature_dims={self.feature_dims}, embedding_dim={self.embedding_dim}, "
            f"num_layers={self.propagation.num_layers}, num_mm_layers={self.num_mm_layers}, "
            f"temperature={self.temperature}, alpha_contrast={self.alpha_contrast}, "
            f"ureg={self.ureg}, club_steps={self.club_steps}, club_pairing={self.club_pairing!r})"
        )
