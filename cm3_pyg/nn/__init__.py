"""Layers, fusion and losses: tensor-in, tensor-out building blocks for PyG models."""

from cm3_pyg.nn.conv import UserItemPropagation, propagate_item_graph
from cm3_pyg.nn.functional import feature_linear, normalize_rows, normalized_concat
from cm3_pyg.nn.fusion import SphericalBezierFusion, slerp
from cm3_pyg.nn.losses import (
    ClampedCosineSimilarity,
    alignment_loss,
    bpr_loss,
    calibrated_uniformity_loss,
    cosine_similarity_matrix,
    info_nce_loss,
    pairwise_sq_distances,
    uniformity_loss,
)
from cm3_pyg.nn.sparse import (
    SparseAdjacency,
    available_backends,
    choose_backend,
    spmm,
    to_adjacency,
)

__all__ = [
    "ClampedCosineSimilarity",
    "SparseAdjacency",
    "SphericalBezierFusion",
    "UserItemPropagation",
    "alignment_loss",
    "available_backends",
    "bpr_loss",
    "calibrated_uniformity_loss",
    "choose_backend",
    "cosine_similarity_matrix",
    "feature_linear",
    "info_nce_loss",
    "normalize_rows",
    "normalized_concat",
    "pairwise_sq_distances",
    "propagate_item_graph",
    "slerp",
    "spmm",
    "to_adjacency",
    "uniformity_loss",
]
