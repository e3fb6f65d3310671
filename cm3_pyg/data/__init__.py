"""Data: MMRec folders and synthetic data as PyG ``HeteroData``, graphs and transforms."""

from cm3_pyg.data.dataset import MMRecDataset, default_cache_dir
from cm3_pyg.data.graphs import (
    bipartite_normalized_adjacency,
    combine_weighted,
    cosine_topk,
    knn_normalized_adjacency,
    modality_weights,
)
from cm3_pyg.data.hetero import ITEM, RATED_BY, RATES, USER, build_hetero_data, split_edge_index
from cm3_pyg.data.mmrec import (
    Interactions,
    MMRecContents,
    discover_modalities,
    load_features,
    read_interactions,
    read_mmrec_folder,
)
from cm3_pyg.data.problems import Problem, ProblemLog
from cm3_pyg.data.synthetic import (
    make_synthetic,
    make_synthetic_arrays,
    per_user_split_labels,
    write_mmrec_folder,
)
from cm3_pyg.data.transforms import ModalityKNNGraph

__all__ = [
    "ITEM",
    "Interactions",
    "MMRecContents",
    "MMRecDataset",
    "ModalityKNNGraph",
    "Problem",
    "ProblemLog",
    "RATED_BY",
    "RATES",
    "USER",
    "bipartite_normalized_adjacency",
    "build_hetero_data",
    "combine_weighted",
    "cosine_topk",
    "default_cache_dir",
    "discover_modalities",
    "knn_normalized_adjacency",
    "load_features",
    "make_synthetic",
    "make_synthetic_arrays",
    "per_user_split_labels",
    "modality_weights",
    "read_interactions",
    "read_mmrec_folder",
    "split_edge_index",
    "write_mmrec_folder",
]
