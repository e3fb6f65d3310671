"""Reduced-precision products: bfloat16 operands, float32 everywhere else.

``with matmul_precision("bf16"): ...`` makes the wide dense products of :mod:`cm3_pyg.nn`
take bfloat16 operands: the modality encoders' first layer (:func:`~cm3_pyg.nn.feature_linear`,
and :func:`reduced_linear` where a model's encoder reads fine-tuned features) and the Gram
matrices of the pairwise losses (:func:`~cm3_pyg.nn.uniformity_loss`,
:func:`~cm3_pyg.nn.calibrated_uniformity_loss`, :func:`~cm3_pyg.nn.info_nce_loss`). Each such
product's result is turned back into float32 at once, so parameters, gradients, optimizer
state, propagation, exponentials and sums stay float32. Outside the context (the default,
``"float32"``) nothing changes.

A constant input, such as a modality feature table that is not trained, is converted once
and the copy is reused for as long as the table is unchanged (:func:`low_precision`), so a
step does not pay a pass over the table for the conversion.

The reference versions (:mod:`cm3_pyg.nn.reference`, :func:`~cm3_pyg.nn.use_reference_math`)
are the float32 model and ignore the setting.

bfloat16 products are fast on CPUs with AVX-512 BF16 or AMX (and on recent GPUs); elsewhere
they are emulated and slower than float32, so :func:`check_precision` refuses them there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from cm3_pyg.nn.kernels import kernels_enabled

__all__ = [
    "PRECISIONS",
    "check_precision",
    "compute_dtype",
    "low_precision",
    "matmul_precision",
    "precision_supported",
    "reduced_addmm",
    "reduced_linear",
    "reduced_matmul",
]

#: The ``precision`` settings: ``float32`` (default) and ``bf16``.
PRECISIONS = ("float32", "bf16")
_DTYPES = {"float32": None, "bf16": torch.bfloat16}

_state = threading.local()
# constant tensor -> (its version counter when converted, the converted copy)
_copies = WeakIdKeyDictionary()


def compute_dtype() -> torch.dtype | None:
    """The operand dtype of the reduced products in this thread, ``None`` for float32 (and
    always under :func:`~cm3_pyg.nn.use_reference_math`, the float32 model)."""
    if not kernels_enabled():
        return None
    return getattr(_state, "dtype", None)


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Run the block with the products' operands in ``precision`` (one of :data:`PRECISIONS`)."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    previous = getattr(_state, "dtype", None)
    _state.dtype = _DTYPES[precision]
    try:
        yield
    finally:
        _state.dtype = previous


def low_precision(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``; for a tensor autograd does not track, the copy made the last time,
    as long as ``x`` has not been modified in place since."""
    if x.dtype == dtype:
        return x
    if x.requires_grad or torch.is_inference_mode_enabled():
        return x.to(dtype)
    saved = _copies.get(x)
    if saved is not None and saved[0] == x._version and saved[1].dtype == dtype:
        return saved[1]
    copy = x.to(dtype)
    _copies[x] = (x._version, copy)
    return copy


def reduced_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``, with operands in :func:`compute_dtype` (when set) and the result in ``a``'s
    dtype."""
    dtype = compute_dtype()
    if dtype is None or a.dtype == dtype:
        return a @ b
    return (low_precision(a, dtype) @ low_precision(b, dtype)).to(a.dtype)


def reduced_addmm(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``torch.addmm(acc, a, b)``; with :func:`compute_dtype` set, ``acc`` plus
    :func:`reduced_matmul` ``(a, b)``."""
    if compute_dtype() is None or a.dtype == compute_dtype():
        return torch.addmm(acc, a, b)
    return acc + reduced_matmul(a, b)


def reduced_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; with :func:`compute_dtype` set, the product of ``x`` and
    ``weight`` in that dtype (a constant ``x`` converted once), returned in ``x``'s dtype,
    and the bias added in ``x``'s dtype. Autograd returns gradients in the inputs' dtypes."""
    dtype = compute_dtype()
    if dtype is None or x.dtype == dtype:
        return torch.nn.functional.linear(x, weight, bias)
    out = torch.nn.functional.linear(low_precision(x, dtype), weight.to(dtype)).to(x.dtype)
    return out if bias is None else out + bias


def precision_supported(precision: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``precision`` runs natively on ``device`` (float32 always does)."""
    if precision == "float32":
        return True
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(checker()) if checker is not None else False
    return False


def check_precision(precision: str, device: torch.device | str = "cpu") -> None:
    """Raise ``ValueError`` for an unknown ``precision`` or one ``device`` lacks."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not precision_supported(precision, device):
        raise ValueError(
            f"precision {precision!r} needs a CPU with AVX-512 BF16 or AMX, or a GPU with "
            f"bfloat16 support; {torch.device(device)} has neither (use 'float32')"
        )
