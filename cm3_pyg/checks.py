"""Argument checks shared by the public functions: one message shape for every misuse.

Each check raises :class:`TypeError` (wrong Python type or tensor dtype) or
:class:`ValueError` (wrong shape or a value out of range) before any tensor work starts, and
its message names the argument (``"bpr_loss: neg_scores"``) and what was expected, so a
misuse never surfaces as a traceback from deep inside torch or, worse, as a silent
wrap-around of a negative id.

Checks of tensor *values* (id ranges, NaN) read the tensor, which on an accelerator is a
host synchronisation; the helpers that do so say it, and the layers call them only where
the tensor is small or on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Range",
    "check_choice",
    "check_ids",
    "check_int",
    "check_number",
    "check_probability_tensor",
    "check_tensor",
    "type_noun",
]

#: how an error names the type a value must have, by the type's name
_TYPE_NOUNS = {
    "bool": "a boolean",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list": "a list",
    "dict": "a mapping",
}


def type_noun(type_name: str) -> str:
    """``"an integer"`` for ``"int"``, ``"a number"`` for ``"float"``, ... (``"a value"`` for
    a type it does not know)."""
    return _TYPE_NOUNS.get(type_name, "a value")


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _shape(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {list(value.shape)} of {value.dtype}"
    return f"a {type(value).__name__}"


def check_tensor(
    value: object,
    name: str,
    *,
    dims: int | Sequence[int] | None = None,
    floating: bool = False,
    integer: bool = False,
) -> Tensor:
    """``value`` itself after checking it is a tensor of the expected rank and dtype kind.

    Args:
        value: the argument.
        name: how the message names it, e.g. ``"alignment_loss: x"``.
        dims: the allowed numbers of dimensions (``None``: any).
        floating: require a floating-point dtype.
        integer: require an integer dtype (not bool).

    Raises:
        TypeError: not a tensor, or the wrong dtype kind.
        ValueError: the wrong number of dimensions.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_shape(value)}")
    if floating and not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if integer and value.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else tuple(dims)
        if value.dim() not in allowed:
            wanted = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {wanted}, got {_shape(value)}")
    return value


def check_number(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``value`` as a float after checking it is a finite real number in the given range.

    A bool or a string is refused (``True`` is not a temperature); a 0-dim tensor is read.

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite or out of range.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    low_bad = minimum is not None and (
        number < minimum or (exclusive_minimum and number == minimum)
    )
    high_bad = maximum is not None and (
        number > maximum or (exclusive_maximum and number == maximum)
    )
    if low_bad or high_bad:
        low = "" if minimum is None else f"{'(' if exclusive_minimum else '['}{minimum:g}"
        high = "" if maximum is None else f"{maximum:g}{')' if exclusive_maximum else ']'}"
        if minimum is None:
            wanted = f"{'<' if exclusive_maximum else '<='} {maximum:g}"
        elif maximum is None:
            wanted = f"{'>' if exclusive_minimum else '>='} {minimum:g}"
        else:
            wanted = f"in {low}, {high}"
        raise ValueError(f"{name} must be {wanted}, got {number:g}")
    return number


def check_int(value: object, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int after checking it is an integer (not a bool, not ``1.5``) and at
    least ``minimum``.

    Raises:
        TypeError: not an integer.
        ValueError: below ``minimum``.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype in _INTEGER_DTYPES:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """``value`` after checking it is one of ``choices``.

    Raises:
        ValueError: anything else, listing the choices.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_ids(ids: object, name: str, bound: int, kind: str) -> Tensor:
    """``ids`` as int64 after checking it is a 1-D integer tensor of ids in ``[0, bound)``.

    Reads the ids (a host synchronisation on an accelerator). Negative ids are refused:
    indexing would silently wrap them around to the last rows.

    Raises:
        TypeError: not an integer tensor.
        ValueError: not 1-D, or an id out of range (the first offending value is named).
    """
    if not isinstance(ids, Tensor) or ids.dim() != 1:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {kind} ids, got {shape}")
    if ids.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{name} must hold integer {kind} ids, got {ids.dtype}")
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= bound:
            bad = low if low < 0 else high
            raise ValueError(f"{name}: {kind} id {bad} is out of range [0, {bound})")
    return ids.long()


def check_probability_tensor(t: Tensor, name: str) -> None:
    """Check that every entry of ``t`` lies in ``[0, 1]`` (NaN refused).

    Reads the tensor (a host synchronisation on an accelerator).

    Raises:
        ValueError: naming the first value outside.
    """
    if t.numel() == 0:
        return
    outside = ~((t >= 0) & (t <= 1))
    if bool(outside.any()):
        bad = float(t.reshape(-1)[outside.reshape(-1)][0])
        raise ValueError(f"{name} must lie in [0, 1], got {bad:g}")


class Range(NamedTuple):
    """The allowed values of a number: ``[minimum, maximum]``, either end open or absent."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def check(self, value: object, name: str, integer: bool = False) -> float | int:
        """``value`` after :func:`check_int` (``integer``) or :func:`check_number` against
        this range."""
        if integer:
            value = check_int(value, name)
        number = check_number(
            value,
            name,
            minimum=self.minimum,
            maximum=self.maximum,
            exclusive_minimum=self.exclusive_minimum,
            exclusive_maximum=self.exclusive_maximum,
        )
        return int(value) if integer else number  # type: ignore[arg-type]
