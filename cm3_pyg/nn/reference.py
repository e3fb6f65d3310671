r"""Reference versions of the fast kernels: the same functions in plain torch, through autograd.

Each function here computes what its namesake in :mod:`cm3_pyg.nn` computes, written so that
the code reads like the formula; gradients come from autograd. They are what the library
runs inside :func:`cm3_pyg.nn.use_reference_math`, the readable starting point for research
variants, and what the tests hold the kernels (:mod:`cm3_pyg.nn.kernels`) to. They keep the
public functions' numerical guarantees (any row scale, zero rows, degenerate angles, no
overflow in the log-sum-exp) but not their speed or memory: the pairwise losses form whole
``[B, B]`` matrices of a batch with its repeated rows written out, the products scatter
every entry.

========================================  ==========================================
reference                                 fast version
========================================  ==========================================
:func:`normalize_rows`                    :func:`cm3_pyg.nn.normalize_rows`
:func:`normalized_concat`                 :func:`cm3_pyg.nn.normalized_concat`
:func:`feature_linear`                    :func:`cm3_pyg.nn.feature_linear`
:func:`slerp`                             :func:`cm3_pyg.nn.slerp`
:func:`uniformity_loss`                   :func:`cm3_pyg.nn.uniformity_loss`
:func:`calibrated_uniformity_loss`        :func:`cm3_pyg.nn.calibrated_uniformity_loss`
:func:`info_nce_loss`                     :func:`cm3_pyg.nn.info_nce_loss`
:func:`gaussian_nll`                      :func:`cm3_pyg.nn.gaussian_nll`
:func:`sparse_matmul`                     :meth:`cm3_pyg.nn.SparseAdjacency.matmul`
:func:`propagate`                         :meth:`cm3_pyg.nn.SparseAdjacency.propagate`
:func:`propagate_rows`                    :meth:`cm3_pyg.nn.SparseAdjacency.propagate_rows`
========================================  ==========================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from cm3_pyg.nn.losses import ClampedCosineSimilarity
    from cm3_pyg.nn.sparse import SparseAdjacency

__all__ = [
    "calibrated_uniformity_loss",
    "feature_linear",
    "gaussian_nll",
    "info_nce_loss",
    "normalize_rows",
    "normalized_concat",
    "propagate",
    "propagate_rows",
    "slerp",
    "sparse_matmul",
    "uniformity_loss",
]


def _norm(x: Tensor) -> Tensor:
    """Euclidean norm of the rows (last dimension), kept as ``[..., 1]``."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _nonzero(x: Tensor) -> Tensor:
    """``x`` with its zeros replaced by ones (a divisor that leaves zero rows zero)."""
    return torch.where(x == 0, torch.ones_like(x), x)


# ------------------------------------------------------------------------------- rows


def normalize_rows(x: Tensor) -> Tensor:
    r""":math:`x / \lVert x \rVert` per row, exact at any finite scale; zero rows stay zero.

    Each row is divided by its largest magnitude first, so that squaring cannot overflow or
    underflow, then by its norm.
    """
    peak = x.abs().amax(dim=-1, keepdim=True)
    scaled = x / _nonzero(peak)
    return scaled / _nonzero(_norm(scaled))


def normalized_concat(groups: Sequence[Sequence[Tensor]]) -> Tensor:
    r"""Per group: stack the row blocks and normalise the rows; then concatenate the groups'
    columns, :math:`[\hat{X}_1, \dots, \hat{X}_G]`."""
    return torch.cat([normalize_rows(torch.cat(list(group), dim=0)) for group in groups], dim=-1)


def feature_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r""":math:`x W^\top + b`."""
    return F.linear(x, weight, bias)


# ------------------------------------------------------------------------------- slerp


def slerp(a: Tensor, b: Tensor, t: Tensor | float) -> Tensor:
    r"""Spherical linear interpolation of rows,
    :math:`\frac{\sin((1-t)\theta)}{\sin\theta} a + \frac{\sin(t\theta)}{\sin\theta} b`.

    * :math:`\theta = 2\,\mathrm{atan2}(\lVert a - b \rVert, \lVert a + b \rVert)`;
    * :math:`\theta \le \pi/2`: the ratios as :math:`s\,\mathrm{sinc}(s\theta) /
      \mathrm{sinc}(\theta)` (linear interpolation at :math:`\theta = 0`);
    * :math:`\theta > \pi/2`: :math:`\cos(t\theta) a + \sin(t\theta) u` with :math:`u` the
      unit direction of :math:`b - (a \cdot b) a`, or, when that vanishes (antipodal rows),
      of :math:`e_k - a_k a` for the axis :math:`k` least aligned with :math:`a`;
    * a zero row: the other endpoint for every ``t``.
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.dim() == 1 and a.dim() == 2:
        t = t.unsqueeze(-1)
    a_zero, b_zero = _norm(a) == 0, _norm(b) == 0
    theta = 2.0 * torch.atan2(_norm(a - b), _norm(a + b))
    near = theta <= math.pi / 2

    near_theta = torch.where(near, theta, torch.zeros_like(theta)) / math.pi  # sinc's units

    def ratio(s: Tensor) -> Tensor:  # sin(s theta) / sin(theta)
        return s * torch.sinc(s * near_theta) / torch.sinc(near_theta)

    near_path = ratio(1 - t) * a + ratio(t) * b

    towards_b = b - (a * b).sum(dim=-1, keepdim=True) * a
    plane = _norm(towards_b) >= 1e-6
    axis = torch.zeros_like(a).scatter(-1, a.abs().argmin(dim=-1, keepdim=True), 1.0)
    towards_axis = axis - (a * axis).sum(dim=-1, keepdim=True) * a
    u = torch.where(
        plane,
        towards_b / torch.where(plane, _norm(towards_b), torch.ones_like(theta)),
        towards_axis / _norm(towards_axis).clamp_min(1e-6),
    )
    far_path = torch.cos(t * theta) * a + torch.sin(t * theta) * u

    out = torch.where(near, near_path, far_path)
    return torch.where(a_zero, b, torch.where(b_zero, a, out))


# ------------------------------------------------------------------------------- losses


def _multiplicities(x: Tensor, counts: Tensor | None) -> Tensor:
    """``[N]`` multiplicities of the rows in the batch (ones without ``counts``)."""
    return torch.ones_like(x[:, 0]) if counts is None else counts.to(x.dtype)


def _log_mean_over_pairs(exponent: Tensor, counts: Tensor) -> Tensor:
    r""":math:`\log` of the mean of :math:`e^{\ell_{ab}}` over ordered pairs of distinct
    positions of the batch in which row ``a`` occurs :math:`m_a` times: pair ``(a, b)``
    counts :math:`m_a m_b` times, a row with a copy of itself :math:`m_a (m_a - 1)` times.
    0 when the batch has fewer than two positions."""
    size = counts.sum()
    if float(size) < 2:
        return exponent.sum() * 0.0
    pairs = torch.outer(counts, counts) - torch.diag(counts)
    return torch.logsumexp((exponent + pairs.log()).flatten(), dim=0) - torch.log(size * (size - 1))


def _squared_distances(x: Tensor) -> Tensor:
    r""":math:`\lVert x_a - x_b \rVert^2` for every pair of rows, ``[N, N]``."""
    return (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(dim=-1)


def uniformity_loss(x: Tensor, t: float = 2.0, counts: Tensor | None = None) -> Tensor:
    r""":math:`\log \frac{1}{B(B-1)} \sum_{a \ne b} e^{-t \lVert x_a - x_b \rVert^2}` over
    the ``B`` positions of the batch (row ``a`` repeated ``counts[a]`` times)."""
    return _log_mean_over_pairs(-t * _squared_distances(x), _multiplicities(x, counts))


def calibrated_uniformity_loss(
    x: Tensor,
    sim: Tensor | ClampedCosineSimilarity,
    t: float = 2.0,
    counts: Tensor | None = None,
) -> Tensor:
    r""":math:`\log \frac{1}{B(B-1)} \sum_{a \ne b}
    e^{-t (\lVert x_a - x_b \rVert^2 - 2 + 2 s_{ab})}`.

    ``sim`` is the ``[N, N]`` matrix :math:`s` (its upper triangle mirrored, its diagonal
    for a row paired with its own copy) or a :class:`~cm3_pyg.nn.ClampedCosineSimilarity`
    :math:`s_{ab} = \mathrm{clamp}(\cos(f_a, f_b), s_{\min}, s_{\max})`.
    """
    if isinstance(sim, Tensor):
        upper = torch.triu(sim, diagonal=1)
        s = upper + upper.t() + torch.diag(sim.diagonal())
    else:
        unit = normalize_rows(sim.features)
        s = unit @ unit.t()
        if (sim.min_sim, sim.max_sim) != (None, None):
            s = s.clamp(min=sim.min_sim, max=sim.max_sim)
    exponent = -t * (_squared_distances(x) - 2.0 + 2.0 * s)
    return _log_mean_over_pairs(exponent, _multiplicities(x, counts))


def info_nce_loss(anchor: Tensor, other: Tensor, temperature: float = 1.0) -> Tensor:
    r""":math:`-\frac{1}{N}\sum_i \log \mathrm{softmax}_j(\langle a_i, o_j \rangle / \tau)_i`."""
    logits = anchor @ other.t() / temperature
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def gaussian_nll(mu: Tensor, logvar: Tensor, y: Tensor, row_weight: Tensor) -> Tensor:
    r""":math:`\sum_i w_i \sum_j \tfrac12[(\mu_{ij} - y_{ij})^2 e^{-\ell_{ij}} + \ell_{ij}]`
    (``logvar`` :math:`\ell`; the weights :math:`w` are not differentiated)."""
    per_row = 0.5 * ((mu - y).pow(2) * torch.exp(-logvar) + logvar).sum(dim=1)
    return (per_row * row_weight.detach()).sum()


# ------------------------------------------------------------------------------- propagation


def sparse_matmul(adj: SparseAdjacency, x: Tensor) -> Tensor:
    r""":math:`(A x)_i = \sum_j A_{ij} x_j` over the stored entries of ``adj``."""
    messages = adj.value.to(x.dtype).unsqueeze(-1) * x.index_select(0, adj.col)
    return x.new_zeros(adj.shape[0], x.size(1)).index_add(0, adj.row, messages)


def propagate(adj: SparseAdjacency, x: Tensor, num_layers: int, combine: str = "sum") -> Tensor:
    r"""The layers :math:`x, A x, \dots, A^L x` combined by ``combine``: their ``"sum"``,
    their ``"mean"`` or the ``"last"`` one (a new tensor, never ``x`` itself)."""
    layers = [x]
    for _ in range(num_layers):
        layers.append(sparse_matmul(adj, layers[-1]))
    if combine == "last":
        return layers[-1].clone() if num_layers == 0 else layers[-1]
    total = torch.stack(layers).sum(dim=0)
    return total / (num_layers + 1) if combine == "mean" else total


def propagate_rows(
    adj: SparseAdjacency,
    x: Tensor,
    num_layers: int,
    combine: str,
    num_users: int,
    users: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(out[users], out[num_users:])`` of :func:`propagate` (users first)."""
    out = propagate(adj, x, num_layers, combine)
    return out[:num_users][users], out[num_users:]
