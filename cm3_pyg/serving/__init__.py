"""Inference from a trained run's artifact: top-K in external ids, export, an HTTP server.

Everything here reads only the run's ``artifact.pt``
(:mod:`cm3_pyg.training.artifact`): no dataset and no model code are needed.
"""

from cm3_pyg.serving.export import export_embeddings
from cm3_pyg.serving.http import RecommendationServer, make_server
from cm3_pyg.serving.recommender import TopK, UnknownUserError
from cm3_pyg.training.artifact import ARTIFACT_NAME, Artifact, load_artifact, save_artifact

__all__ = [
    "ARTIFACT_NAME",
    "Artifact",
    "RecommendationServer",
    "TopK",
    "UnknownUserError",
    "export_embeddings",
    "load_artifact",
    "make_server",
    "save_artifact",
]
