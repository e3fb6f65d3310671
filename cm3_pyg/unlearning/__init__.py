"""Unlearning (MMRecUn): forget edges, users, items or one modality of items in a trained model.

:func:`build_retain_data` turns a :class:`ForgetRequest` into the retain data;
:func:`unlearn` runs the reverse-BPR + retain-loss procedure on a model whose forgotten rows
were reset (:meth:`~cm3_pyg.models.Recommender.copy_rows` from a fresh model).
"""

from cm3_pyg.unlearning.procedure import (
    ForgetTarget,
    UnlearningResult,
    UnlearningSettings,
    forget_metrics,
    forget_target,
    never_seen_recall,
    reset_seed,
    unlearn,
)
from cm3_pyg.unlearning.retain import (
    REQUEST_KINDS,
    RETAIN_NAME,
    ForgetRequest,
    RetainData,
    apply_retain,
    build_retain_data,
    load_retain,
    save_retain,
)
from cm3_pyg.unlearning.run import unlearn_run

__all__ = [
    "REQUEST_KINDS",
    "RETAIN_NAME",
    "ForgetRequest",
    "ForgetTarget",
    "RetainData",
    "UnlearningResult",
    "UnlearningSettings",
    "apply_retain",
    "build_retain_data",
    "forget_metrics",
    "forget_target",
    "load_retain",
    "never_seen_recall",
    "reset_seed",
    "save_retain",
    "unlearn",
    "unlearn_run",
]
