r"""LIRDRec: learnable item representations from features only (Zhou et al., arXiv 2505.04960).

Reference followed: github.com/enoche/LIRDRec (``src/models/lirdrec.py``, built on MMRec) and
section 3 of the CM3 spec:

* items have **no ID embedding**: one channel per modality,
  :math:`z_m = W_{2,m}\,\mathrm{LeakyReLU}(W_{1,m} x_m)` (:math:`d_m \to 4d \to d`, second
  layer without bias), plus a "transformation" channel, the same kind of MLP applied to the
  orthonormal DCT-II of every modality's feature rows, concatenated in modality order
  (:math:`\sum_m d_m \to 4d \to d`);
* users own a free ``d``-dim preference per channel; node input is the concatenation over
  channels of the row-normalised ``[user part; item part]``; propagation over the normalised
  user-item graph is the SUM of layers ``0..n_ui_layers`` (as CM3), then items take the
  frozen modality kNN graph step :math:`h_i \leftarrow h_i + S^{n} h_i`;
* users fuse their channels with **progressive weight copying** (PWC, see
  :class:`ProgressiveWeightCopying`);
* loss: BPR on the fused embeddings plus ``reg_weight`` times the mean squared entry of the
  WHOLE user and item output tables, :math:`\mathrm{mean}(U^2) + \mathrm{mean}(Q^2)`, as the
  reference; its configuration trains with Adam at ``learning_rate`` 1e-4.

Progressive weight copying, exactly as the reference's ``PWC`` / ``update_weights``: per channel
``c`` a small scorer :math:`a_c(h) = w_2^\top \mathrm{LeakyReLU}(W_1 h + b_1) + b_2`
(:math:`d \to d/4 \to 1`) reads the user's propagated channel vector; a free per-user table
:math:`\Theta \in \mathbb{R}^{U \times C}` (Xavier-normal) is mixed in,
:math:`\alpha_u = \mathrm{softmax}(\omega_1 a(h_u) + \omega_2 \Theta_u)`, and the user vector
is :math:`\mathrm{concat}_c\, \alpha_{u,c} h_u^c`. At the start of every epoch ``e`` (1-based):
:math:`\omega_1 \leftarrow \omega_1 \beta^{e} / (\omega_1 \beta^{e} + \omega_2)`,
:math:`\omega_2 \leftarrow \omega_2 / (\omega_1 \beta^{e} + \omega_2)` (``decay_base``
:math:`\beta`, starting from :math:`\omega_1 = ` ``decay_weight``, :math:`\omega_2 = 1 -
\omega_1`), and :math:`\Theta` is overwritten with the attention :math:`\alpha` of the last
training forward pass ("copying" the learned weights into the free table). Adam keeps
training :math:`\Theta` in between (its moment estimates are not reset). So the weighting
moves from the scorers' output to a per-user table that starts from what the scorers learned.

Deliberate deviations: any number ``M >= 1`` of modalities (the reference: image + text,
``M + 1 = 3`` channels); the DCT is a fixed orthonormal matrix (:func:`dct_matrix`, built in
float64) instead of the ``torch_dct`` package, applied once per feature table and cached;
evaluation runs a fresh forward in eval mode (the reference scores with the embeddings of
the last training batch), and only training-mode forwards are remembered for the copy;
an epoch of PWC starts in :meth:`LIRDRec.on_epoch_start` (the trainer's per-epoch hook, the
reference's ``pre_epoch_processing``) or explicitly with :meth:`LIRDRec.start_epoch`;
the PWC state (epoch, last attention) is kept in buffers so checkpoints resume it;
the reference's optional degree-sensitive edge pruning (``dropout``, 0 in its configuration)
and its unused trainable feature copies are not implemented; the configured
``weight_decay`` reaches Adam (the reference's grid lists ``weight_decay`` values, but its
trainer builds Adam without weight decay, so they all train the same model there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import LeakyReLU, Linear, ModuleList, Parameter, Sequential

from cm3_pyg.checks import Range
from cm3_pyg.models._common import split_users_items
from cm3_pyg.models.base import Batch, BatchRows, GraphInputs, Recommender
from cm3_pyg.nn import (
    UserItemPropagation,
    feature_linear,
    normalized_concat,
    propagate_item_graph,
)
from cm3_pyg.nn.parallel import RowShard
from cm3_pyg.nn.rows import RowTable
from cm3_pyg.nn.sparse import SparseAdjacency


def dct_matrix(
    n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    r"""The orthonormal DCT-II matrix :math:`C \in \mathbb{R}^{n \times n}`.

    .. math::
        C_{kj} = s_k \cos\frac{\pi (2j + 1) k}{2n}, \qquad
        s_0 = \sqrt{1/n}, \quad s_{k>0} = \sqrt{2/n},

    so :math:`y = C x` is ``scipy.fft.dct(x, norm="ortho")`` of a vector and
    :math:`C C^\top = I`. Built in float64 (the integer phase :math:`(2j+1)k` is reduced
    modulo :math:`4n` exactly before the cosine) and cast to ``dtype`` at the end.
    """
    if n < 1:
        raise ValueError(f"the DCT needs n >= 1, got {n}")
    k = torch.arange(n, dtype=torch.int64, device=device)
    phase = torch.remainder((2 * k.unsqueeze(0) + 1) * k.unsqueeze(1), 4 * n)
    matrix = torch.cos(phase.to(torch.float64) * (math.pi / (2 * n)))
    scale = torch.full((n, 1), math.sqrt(2.0 / n), dtype=torch.float64, device=device)
    scale[0] = math.sqrt(1.0 / n)
    return (matrix * scale).to(dtype)


def dct_rows(x: Tensor) -> Tensor:
    """Orthonormal DCT-II of every row of ``x`` (``[N, n] -> [N, n]``), in ``x``'s dtype."""
    return x @ dct_matrix(x.size(-1), dtype=x.dtype, device=x.device).t()


def progressive_mixing_weights(
    decay_weight: float, decay_base: float, epoch: int
) -> tuple[float, float]:
    r"""PWC's :math:`(\omega_1, \omega_2)` after the updates of epochs ``1..epoch``.

    Starts from :math:`(\omega_1, \omega_2) = (\mathrm{decay\_weight}, 1 - \mathrm{decay\_weight})`;
    epoch ``e`` multiplies :math:`\omega_1` by :math:`\beta^{e}` and renormalises the pair to
    sum 1 (the reference's ``update_weights``), so :math:`\omega_1` decays like
    :math:`\beta^{e(e+1)/2}`.
    """
    w1, w2 = float(decay_weight), 1.0 - float(decay_weight)
    for e in range(1, epoch + 1):
        w1 *= decay_base**e
        total = w1 + w2
        w1, w2 = w1 / total, w2 / total
    return w1, w2


class ProgressiveWeightCopying(torch.nn.Module):
    r"""LIRDRec's user-side channel weighting (see the module docstring).

    Args:
        num_users: ``U``.
        num_channels: ``C``.
        dim: ``d``, the width of each channel.
        decay_base: :math:`\beta`.
        decay_weight: initial :math:`\omega_1`.

    Buffers (saved with the model): ``epoch`` (epochs started), ``last_attention`` ``[U, C]``
    (the attention of the last training forward, copied into ``theta`` at the next epoch
    start).
    """

    def __init__(
        self, num_users: int, num_channels: int, dim: int, decay_base: float, decay_weight: float
    ) -> None:
        super().__init__()
        if not 0.0 <= decay_weight <= 1.0:
            raise ValueError(f"decay_weight must lie in [0, 1], got {decay_weight}")
        if not 0.0 < decay_base <= 1.0:
            raise ValueError(f"decay_base must lie in (0, 1], got {decay_base}")
        hidden = max(dim // 4, 1)
        self.num_users = num_users
        self.num_channels = num_channels
        self.decay_base = decay_base
        self.decay_weight = decay_weight
        self.scorers = ModuleList(
            Sequential(Linear(dim, hidden), LeakyReLU(), Linear(hidden, 1))
            for _ in range(num_channels)
        )
        self.theta = Parameter(torch.empty(num_users, num_channels))
        self.register_buffer("last_attention", torch.empty(num_users, num_channels))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for scorer in self.scorers:
            for layer in scorer:
                if isinstance(layer, Linear):
                    layer.reset_parameters()
        std = (2.0 / (self.num_users + self.num_channels)) ** 0.5  # Xavier-normal of [U, C]
        torch.nn.init.normal_(self.theta, std=std)
        with torch.no_grad():
            self.last_attention.copy_(self.theta)
        self.epoch.zero_()

    def row_tables(self) -> list[RowTable]:
        """``theta`` and ``last_attention``: one row per user."""
        return [RowTable("theta", "user"), RowTable("last_attention", "user")]

    def mixing_weights(self) -> tuple[float, float]:
        r"""The current :math:`(\omega_1, \omega_2)`."""
        return progressive_mixing_weights(self.decay_weight, self.decay_base, int(self.epoch))

    @torch.no_grad()
    def start_epoch(self) -> None:
        """Advance the epoch: decay :math:`\\omega_1` and copy the last attention into ``theta``."""
        self.epoch += 1
        self.theta.copy_(self.last_attention)

    def attention(self, channels: Sequence[Tensor]) -> Tensor:
        r"""``[U, C]`` :math:`\mathrm{softmax}(\omega_1 a(h) + \omega_2 \Theta)`."""
        scores = torch.cat([scorer(h) for scorer, h in zip(self.scorers, channels, strict=True)], 1)
        w1, w2 = self.mixing_weights()
        return torch.softmax(w1 * scores + w2 * self.theta, dim=1)

    def forward(self, channels: Sequence[Tensor] | Tensor) -> Tensor:
        """``C`` tensors ``[U, d]`` (or their concatenation ``[U, C d]``) -> ``[U, C d]``,
        channel ``c`` scaled by its attention; remembers the attention in training mode."""
        table = channels if isinstance(channels, Tensor) else None
        if table is not None:
            channels = table.split(table.size(1) // self.num_channels, dim=1)
        if len(channels) != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels, got {len(channels)}")
        att = self.attention(channels)
        if self.training:
            with torch.no_grad():
                self.last_attention.copy_(att)
        if table is None:
            table = torch.cat(list(channels), dim=1)
        # one product over the [U, C, d] view instead of C scaled copies and a concatenation
        weighted = table.view(table.size(0), self.num_channels, -1) * att.unsqueeze(-1)
        return weighted.flatten(1)


def _channel_mlp(in_dim: int, dim: int) -> Sequential:
    return Sequential(Linear(in_dim, 4 * dim), LeakyReLU(), Linear(4 * dim, dim, bias=False))


def _encode(mlp: Sequential, x: Tensor | RowShard) -> Tensor:
    """``mlp(x)`` with the first layer by :func:`~cm3_pyg.nn.feature_linear` (same values;
    the wide-table kernel, and divided by rows across processes)."""
    first, activation, second = mlp
    return second(activation(feature_linear(x, first.weight, first.bias)))


class LIRDRec(Recommender):
    r"""LIRDRec over ``M >= 1`` item modalities, ``M + 1`` channels (see the module docstring).

    .. math::
        [U; Q] = \sum_{l=0}^{L} \hat A^{l}\, \mathrm{concat}_c\,
            \mathrm{normalize}([P_c; Z_c]), \qquad
        Q \leftarrow Q + S^{n} Q, \qquad
        \mathbf{u} = \mathrm{PWC}(U), \qquad \hat y_{ui} = \mathbf{u}_u^\top \mathbf{q}_i

    with :math:`Z_c` the ``M`` modality channels and the DCT channel. Loss of users :math:`u`,
    positives :math:`i`, negatives :math:`j`:
    :math:`\mathrm{BPR}(\mathbf{u}_u, \mathbf{q}_i, \mathbf{q}_j) + \lambda
    (\mathrm{mean}(\mathbf{U}^2) + \mathrm{mean}(\mathbf{Q}^2))` over the whole tables.

    Args:
        num_users: ``U``.
        num_items: ``I``.
        feature_dims: ``[d_1, ..., d_M]``.
        embedding_dim: ``d`` per channel.
        num_ui_layers: user-item propagation layers ``L`` (sum of layers).
        num_mm_layers: item-graph steps ``n``.
        reg_weight: :math:`\lambda`.
        decay_base: PWC's :math:`\beta`.
        decay_weight: PWC's initial :math:`\omega_1`.
    """

    name = "lirdrec"
    hyperparameter_ranges: ClassVar[dict[str, Range]] = {
        "decay_base": Range(0, 1, exclusive_minimum=True),
        "decay_weight": Range(0, 1),
    }
    min_modalities = 1
    uses_item_graph = True
    row_local_features = True  # feature_linear and the row-wise DCT read the features
    id_rows = {"user_embedding": ("user", 1)}

    def __init__(
        self,
        num_users: int,
        num_items: int,
        feature_dims: Sequence[int],
        embedding_dim: int = 64,
        num_ui_layers: int = 3,
        num_mm_layers: int = 1,
        reg_weight: float = 1e-3,
        decay_base: float = 0.9,
        decay_weight: float = 0.95,
    ) -> None:
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items
        self.feature_dims = self.check_feature_dims(feature_dims)
        self.num_modalities = len(self.feature_dims)
        self.num_channels = self.num_modalities + 1
        self.embedding_dim = embedding_dim
        self.num_mm_layers = num_mm_layers
        self.reg_weight = reg_weight
        d = embedding_dim
        self.encoders = ModuleList(_channel_mlp(dm, d) for dm in self.feature_dims)
        self.dct_encoder = _channel_mlp(sum(self.feature_dims), d)
        self.user_embedding = Parameter(torch.empty(self.num_channels, num_users, d))
        self.pwc = ProgressiveWeightCopying(
            num_users, self.num_channels, d, decay_base, decay_weight
        )
        self.propagation = UserItemPropagation(num_ui_layers, combine="sum")
        # Caches keyed on the identity of the inputs (not parameters, not saved).
        self._dct_cache: tuple[tuple[Tensor, ...], tuple[int, ...], Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for mlp in (*self.encoders, self.dct_encoder):
            for layer in mlp:
                if isinstance(layer, Linear):
                    layer.reset_parameters()  # PyTorch's default, as the reference
        std = (2.0 / (self.num_users + self.embedding_dim)) ** 0.5  # Xavier-normal of [U, d]
        torch.nn.init.normal_(self.user_embedding, std=std)
        self.pwc.reset_parameters()

    # --- inputs ---------------------------------------------------------------------------

    def dct_features(self, features: Sequence[Tensor]) -> Tensor | RowShard:
        """``[I, sum d_m]``: the DCT-II of each modality's rows, concatenated (cached). Of
        :class:`~cm3_pyg.nn.parallel.RowShard` tables (a trainer on several processes): the
        same rows of the result, as a ``RowShard`` (the transform is row-wise)."""
        shards = [f for f in features if isinstance(f, RowShard)]
        if shards:
            if len(shards) != len(features):
                raise ValueError("dct_features: either every feature table is a RowShard or none")
            local = self.dct_features([f.local for f in shards])
            assert isinstance(local, Tensor)
            return RowShard(local, shards[0].num_rows, shards[0].split)
        feats = tuple(features)
        versions = tuple(int(f._version) for f in feats)
        cache = self._dct_cache
        if (
            cache is not None
            and len(cache[0]) == len(feats)
            and all(a is b for a, b in zip(cache[0], feats, strict=True))
            and cache[1] == versions
        ):
            return cache[2]
        out = torch.cat([dct_rows(x) for x in feats], dim=1)
        if not any(f.requires_grad for f in feats):
            self._dct_cache = (feats, versions, out)
        return out

    # --- model ----------------------------------------------------------------------------

    def item_channels(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``M + 1`` tensors ``[I, d]``: the modality channels, then the DCT channel."""
        if len(features) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} feature tensors, got {len(features)}")
        channels = [_encode(enc, x) for enc, x in zip(self.encoders, features, strict=True)]
        channels.append(_encode(self.dct_encoder, self.dct_features(features)))
        return channels

    def forward(
        self,
        features: Sequence[Tensor],
        ui_adj: SparseAdjacency,
        item_adj: SparseAdjacency | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(user [U, (M+1) d], item [I, (M+1) d])``; ``item_adj=None`` skips the item graph."""
        items = self.item_channels(features)
        # per channel the row-normalised [users; items], written straight into [N, C d];
        # unbind: one backward node for the user table (indexing each channel would
        # zero-fill a full [C, U, d] gradient per channel)
        users = self.user_embedding.unbind(0)
        x0 = normalized_concat([[u, i] for u, i in zip(users, items, strict=True)])
        h = self.propagation(x0, ui_adj)
        user_h, item_h = split_users_items(h, self.num_users)
        user = self.pwc(user_h)
        if item_adj is not None:
            item_h = propagate_item_graph(item_h, item_adj, self.num_mm_layers)
        return user, item_h

    def batch_rows(self, inputs: GraphInputs, batch: Batch) -> BatchRows:
        user_emb, item_emb = self(inputs.features, inputs.ui_adj, self.item_graph(inputs))
        return BatchRows.gather(user_emb, item_emb, batch, out=(user_emb, item_emb))

    def regularization(self, batch: Batch, rows: BatchRows) -> Tensor:
        """``reg_weight`` times the mean squares of the WHOLE user and item tables."""
        user_emb, item_emb = rows.out
        return self.reg_weight * (user_emb.pow(2).mean() + item_emb.pow(2).mean())

    def start_epoch(self) -> None:
        """Start a PWC epoch (the reference's ``pre_epoch_processing``)."""
        self.pwc.start_epoch()

    def on_epoch_start(self, epoch: int, inputs: GraphInputs) -> None:
        self.start_epoch()

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        return self(inputs.features, inputs.ui_adj, self.item_graph(inputs))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_users={self.num_users}, num_items={self.num_items}, "
            f"feature_dims={self.feature_dims}, embedding_dim={self.embedding_dim}, "
            f"num_ui_layers={self.propagation.num_layers}, num_mm_layers={self.num_mm_layers}, "
            f"reg_weight={self.reg_weight}, decay_base={self.pwc.decay_base}, "
            f"decay_weight={self.pwc.decay_weight})"
        )
