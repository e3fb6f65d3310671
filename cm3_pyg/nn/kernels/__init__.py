r"""Hand-written autograd kernels of :mod:`cm3_pyg.nn`, and the one policy that picks them.

Every fast kernel here has a plain-torch counterpart in :mod:`cm3_pyg.nn.reference` that
computes the same function through autograd. The public functions (:func:`~cm3_pyg.nn.slerp`,
:func:`~cm3_pyg.nn.uniformity_loss`, :meth:`~cm3_pyg.nn.SparseAdjacency.propagate`, ...)
ask :func:`use_kernel` on every call which of the two runs; nothing else decides.

* Default: the kernels run wherever they apply (the conditions are listed in
  :func:`use_kernel`), the reference versions elsewhere.
* :func:`use_reference_math` (a context manager) or ``set_kernels(False)`` sends every call
  through the reference versions: a readable model for research prototypes, and a check
  that a whole model computes the same loss and gradients without the kernels.

Modules, one per topic: :mod:`~cm3_pyg.nn.kernels.rows` (row normalisation, the wide
linear layer), :mod:`~cm3_pyg.nn.kernels.slerp`, :mod:`~cm3_pyg.nn.kernels.pairwise`
(uniformity and InfoNCE), :mod:`~cm3_pyg.nn.kernels.spmm` (CSR propagation) and
:mod:`~cm3_pyg.nn.kernels.gaussian` (CLUB's likelihood). BENCHMARKS.md ("Kernels and their
reference versions") has what each one was measured to save.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "WIDE_INPUT_FEATURES",
    "Kernel",
    "host_checks_are_free",
    "kernels_enabled",
    "set_kernels",
    "use_kernel",
    "use_reference_math",
]

#: The kernels :func:`use_kernel` decides about.
Kernel = Literal[
    "normalize_rows",
    "normalized_concat",
    "feature_linear",
    "slerp",
    "pairwise_log_sum_exp",
    "info_nce",
    "sparse_product",
    "csr_layer_sum",
    "csr_batch_rows",
    "gaussian_nll",
]

#: From this many input features on, :func:`~cm3_pyg.nn.feature_linear` uses its kernel on
#: CPU (the transposed weight-gradient GEMM); narrower inputs ran alike either way.
WIDE_INPUT_FEATURES = 2048

_enabled = True


def kernels_enabled() -> bool:
    """Whether the fast kernels may run (``False`` inside :func:`use_reference_math`)."""
    return _enabled


def set_kernels(enabled: bool) -> bool:
    """Turn the fast kernels on or off for the whole process; returns the previous setting.

    Off, every function of :mod:`cm3_pyg.nn` runs its :mod:`cm3_pyg.nn.reference` version.
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextmanager
def use_reference_math() -> Iterator[None]:
    """Run everything inside the block through the plain-torch reference versions.

    The setting is process-wide (not per thread) and restored on exit, also on an error.
    Usable as a decorator too.
    """
    previous = set_kernels(False)
    try:
        yield
    finally:
        set_kernels(previous)


def host_checks_are_free(device: torch.device) -> bool:
    """Whether a kernel may look at a tensor's values on the host (``float(x.max())``).

    On CPU that costs nothing, so kernels take their cheaper path after checking it is
    safe (the direct row norm, a precomputed log-sum-exp shift); on an accelerator the
    check would be a host synchronisation per call, so they take their always-exact path.
    """
    return device.type == "cpu"


def use_kernel(
    kernel: Kernel,
    x: Tensor,
    *,
    t: Tensor | None = None,
    backend: str | None = None,
) -> bool:
    """Whether this call runs the fast ``kernel`` (``True``) or the reference version.

    ``False`` for every kernel while the kernels are switched off (:func:`set_kernels`).
    Otherwise:

    * ``"slerp"``: 2-D rows and a ``t`` that needs no gradient (the hand backward gives
      none for ``t``);
    * ``"feature_linear"``: a 2-D input of at least :data:`WIDE_INPUT_FEATURES` columns
      on CPU (the GEMM layout it picks was measured there only);
    * ``"sparse_product"``: always; it is the adjacency's ``backend`` product (for
      ``"csr"`` the kernel with a prebuilt transpose, otherwise PyG's or torch-sparse's);
    * ``"csr_layer_sum"``: an adjacency prepared for the ``"csr"`` ``backend`` (other
      backends loop over their product);
    * ``"csr_batch_rows"``: as ``"csr_layer_sum"``, on CPU (the caller also needs the
      graph to be bipartite, users first, and at least one layer);
    * every other kernel: always.

    Args:
        kernel: which kernel.
        x: the call's main input (its shape and device decide).
        t: slerp's interpolation parameter.
        backend: the adjacency's backend for the sparse kernels.
    """
    if not _enabled:
        return False
    if kernel == "slerp":
        return x.dim() == 2 and (t is None or not t.requires_grad)
    if kernel == "feature_linear":
        return x.dim() == 2 and x.device.type == "cpu" and x.size(1) >= WIDE_INPUT_FEATURES
    if kernel == "csr_layer_sum":
        return backend == "csr"
    if kernel == "csr_batch_rows":
        return backend == "csr" and x.device.type == "cpu"
    return True
