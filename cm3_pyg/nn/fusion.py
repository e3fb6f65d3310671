r"""Fusion of modality representations on the unit sphere.

:func:`slerp` interpolates along the great circle between two unit vectors, and
:class:`SphericalBezierFusion` chains slerps (de Casteljau's algorithm) into a spherical
Bezier curve through any number of modality "control points".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cm3_pyg.checks import (
    check_int,
    check_number,
    check_probability_tensor,
    check_tensor,
)
from cm3_pyg.nn import reference
from cm3_pyg.nn.functional import normalize_rows
from cm3_pyg.nn.kernels import slerp as slerp_kernel
from cm3_pyg.nn.kernels import use_kernel


def slerp(a: Tensor, b: Tensor, t: Tensor | float) -> Tensor:
    r"""Spherical linear interpolation between unit rows.

    .. math::
        \mathrm{slerp}(a, b; t) = \frac{\sin((1-t)\theta)}{\sin\theta} a
            + \frac{\sin(t\theta)}{\sin\theta} b, \qquad \theta = \angle(a, b)

    Numerically stable over the whole range of angles and never NaN (values or
    gradients):

    * :math:`\theta = 2\,\mathrm{atan2}(\|a - b\|, \|a + b\|)`, accurate near 0 and
      :math:`\pi` (unlike ``acos(a . b)``) with a finite gradient there;
    * for :math:`\theta \le \pi/2` the coefficients are ratios of ``sinc`` (exact and
      smooth at :math:`\theta = 0`, where slerp becomes linear interpolation);
    * for larger angles the equivalent form :math:`\cos(t\theta) a + \sin(t\theta) u`,
      with :math:`u = r / \|r\|`, :math:`r = b - (a \cdot b) a`, avoids dividing by a
      vanishing :math:`\sin\theta`; for (numerically) antipodal rows, where that plane
      is undefined, :math:`u` turns towards the coordinate axis least aligned with
      :math:`a`, a deterministic choice among the equally valid great circles.

    A zero row has no direction (e.g. a modality without signal for an item): the
    interpolation then stays at the other endpoint for every ``t``, so fusion ignores
    that control point; two zero rows give a zero row.

    On ``[N, d]`` rows with a ``t`` that needs no gradient this runs
    :mod:`cm3_pyg.nn.kernels.slerp` (per-row coefficients, the backward written out on
    them: the fusion runs on every item in every training step); otherwise, or inside
    :func:`~cm3_pyg.nn.use_reference_math`, :func:`cm3_pyg.nn.reference.slerp` through
    autograd. The two agree in value and gradient (tested in float64).

    Args:
        a: ``[N, d]`` unit (or zero) rows (``t = 0``), or one ``[d]`` row.
        b: ``[N, d]`` unit (or zero) rows (``t = 1``).
        t: scalar or tensor broadcastable to ``[N, 1]``, in ``[0, 1]`` (a tensor ``t`` is
            range-checked only on the CPU, where reading it is free).

    Returns:
        ``[N, d]`` unit rows (zero where both inputs are zero).
    """
    check_tensor(a, "slerp: a", dims=(1, 2), floating=True)
    check_tensor(b, "slerp: b", dims=(1, 2), floating=True)
    if a.shape != b.shape:
        raise ValueError(
            f"slerp needs a and b of the same shape, got {list(a.shape)} and {list(b.shape)}"
        )
    t = _check_t(t, a, "slerp: t")
    if use_kernel("slerp", a, t=t):
        return slerp_kernel.slerp(a, b, t)
    return reference.slerp(a, b, t)


def _check_t(t: Tensor | float, like: Tensor, name: str) -> Tensor:
    """``t`` as a tensor of ``like``'s dtype and device, shaped to broadcast over its rows:
    a number in ``[0, 1]``, or a ``[N]``/``[N, 1]`` (or one-row) tensor of such values
    (``N = 1`` for a single 1-D row)."""
    if isinstance(t, Tensor):
        check_tensor(t, name, dims=(0, 1, 2), floating=True)
        rows = like.size(0) if like.dim() == 2 else 1
        if t.dim() >= 1 and (t.size(0) not in (1, rows) or (t.dim() == 2 and t.size(1) != 1)):
            raise ValueError(
                f"{name} must be a number or a [{rows}] or [{rows}, 1] tensor, "
                f"got shape {list(t.shape)}"
            )
        if t.device.type == "cpu":
            check_probability_tensor(t, name)
        t = t.to(dtype=like.dtype, device=like.device)
    else:
        check_number(t, name, minimum=0.0, maximum=1.0)
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.unsqueeze(-1) if t.dim() == 1 and like.dim() == 2 else t


class SphericalBezierFusion(torch.nn.Module):
    r"""Fuse ``M`` modality representations with a spherical Bezier curve.

    The ``M`` inputs are L2-normalised (at any scale, see
    :func:`~cm3_pyg.nn.functional.normalize_rows`) into control points :math:`P_0, \dots, P_{M-1}`
    on the unit sphere and combined by de Casteljau's recursion of slerps:

    .. math::
        P_i^{(r)} = \mathrm{slerp}(P_i^{(r-1)}, P_{i+1}^{(r-1)}; t), \quad r = 1, \dots, M-1,

    returning :math:`P_0^{(M-1)}`, which lies on the sphere. With ``M = 2`` this is a
    single slerp; with ``M = 1`` the normalised input is returned.

    In training mode ``t`` is drawn per row from :math:`\mathrm{Beta}(\alpha, \alpha)`
    (a stochastic mixing that acts as augmentation); in evaluation mode ``t = 0.5`` (the
    mean of that distribution), so inference is deterministic.

    Args:
        num_modalities: number of inputs ``M`` (>= 1).
        alpha: concentration of the Beta distribution (> 0).

    Shapes:
        input: a sequence of ``M`` tensors ``[N, d]``; optional ``t`` ``[N, 1]``.
        output: ``[N, d]`` unit rows.
    """

    def __init__(self, num_modalities: int, alpha: float = 0.5) -> None:
        super().__init__()
        self.num_modalities = check_int(
            num_modalities, "SphericalBezierFusion: num_modalities", minimum=1
        )
        self.alpha = check_number(
            alpha, "SphericalBezierFusion: alpha", minimum=0.0, exclusive_minimum=True
        )

    def reset_parameters(self) -> None:
        """No learnable parameters; present for a uniform module interface."""

    def sample_t(self, num_rows: int, like: Tensor) -> Tensor:
        """The interpolation parameter for ``num_rows`` rows: random in training, 0.5 in eval."""
        if not self.training:
            return like.new_full((num_rows, 1), 0.5)
        concentration = torch.tensor(self.alpha, dtype=like.dtype, device=like.device)
        beta = torch.distributions.Beta(concentration, concentration)
        return beta.sample((num_rows, 1))

    def forward(self, xs: Sequence[Tensor], t: Tensor | None = None) -> Tensor:
        if isinstance(xs, Tensor) or not isinstance(xs, Sequence):
            raise TypeError(
                "SphericalBezierFusion: xs must be a list or tuple of [N, d] tensors, one per "
                f"modality, got {type(xs).__name__}"
            )
        if len(xs) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} modality tensors, got {len(xs)}")
        for m, x in enumerate(xs):
            check_tensor(x, f"SphericalBezierFusion: xs[{m}]", dims=2, floating=True)
            if x.shape != xs[0].shape:
                raise ValueError(
                    f"SphericalBezierFusion: xs[{m}] has shape {list(x.shape)}, "
                    f"xs[0] has {list(xs[0].shape)} (every modality needs the same [N, d])"
                )
        points = [normalize_rows(x) for x in xs]  # exact at any feature scale
        if t is None:
            t = self.sample_t(points[0].size(0), points[0])
        else:
            t = _check_t(t, points[0], "SphericalBezierFusion: t")
        while len(points) > 1:
            points = [slerp(p, q, t) for p, q in zip(points[:-1], points[1:], strict=False)]
        return points[0]

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_modalities={self.num_modalities}, alpha={self.alpha})"
        )
