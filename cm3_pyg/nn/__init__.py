"""Layers, fusion and losses: tensor-in, tensor-out building blocks for PyG models.

The fast paths are hand-written kernels (:mod:`cm3_pyg.nn.kernels`); each has a plain-torch
reference version (:mod:`cm3_pyg.nn.reference`). :func:`use_reference_math` runs everything
through the reference versions.
"""

from cm3_pyg.nn import reference
from cm3_pyg.nn.conv import UserItemPropagation, propagate_item_graph
from cm3_pyg.nn.functional import feature_linear, normalize_rows, normalized_concat
from cm3_pyg.nn.fusion import SphericalBezierFusion, slerp
from cm3_pyg.nn.kernels import kernels_enabled, set_kernels, use_reference_math
from cm3_pyg.nn.losses import (
    ClampedCosineSimilarity,
    alignment_loss,
    bpr_loss,
    calibrated_uniformity_loss,
    cosine_similarity_matrix,
    gaussian_nll,
    info_nce_loss,
    pairwise_sq_distances,
    uniformity_loss,
)
from cm3_pyg.nn.sparse import (
    Adjacency,
    SparseAdjacency,
    adjacency_shape,
    as_adjacency,
    available_backends,
    choose_backend,
    spmm,
    to_adjacency,
)

__all__ = [
    "Adjacency",
    "ClampedCosineSimilarity",
    "SparseAdjacency",
    "SphericalBezierFusion",
    "UserItemPropagation",
    "adjacency_shape",
    "alignment_loss",
    "as_adjacency",
    "available_backends",
    "bpr_loss",
    "calibrated_uniformity_loss",
    "choose_backend",
    "cosine_similarity_matrix",
    "feature_linear",
    "gaussian_nll",
    "info_nce_loss",
    "kernels_enabled",
    "normalize_rows",
    "normalized_concat",
    "pairwise_sq_distances",
    "propagate_item_graph",
    "reference",
    "set_kernels",
    "slerp",
    "spmm",
    "to_adjacency",
    "uniformity_loss",
    "use_reference_math",
]
