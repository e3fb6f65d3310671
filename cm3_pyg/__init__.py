"""cm3_pyg: CM3 and related multimodal recommenders on PyTorch Geometric."""

__version__ = "0.1.0"
