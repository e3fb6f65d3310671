"""Which rows of a module's tensors belong to which user or item (:class:`RowTable`).

Unlearning resets the rows of forgotten users and items and must find every tensor that
holds such rows: ID embeddings, per-user attention, fine-tuned feature copies, NBPO's flip
factors. A module declares them by a ``row_tables()`` method returning ``RowTable`` s with
names relative to itself; :meth:`cm3_pyg.models.Recommender.row_tables` collects them.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ROW_KINDS", "RowTable"]

ROW_KINDS = ("user", "item")


class RowTable(NamedTuple):
    """A parameter or buffer indexed by user or item id along one axis.

    Attributes:
        name: dotted name of the parameter or buffer (as in ``named_parameters()``).
        kind: ``"user"`` or ``"item"``.
        axis: the dimension indexed by the id.
        modality: for item tables derived from one modality's features (a fine-tuned copy
            of them), that modality's position in the fusion order; ``None`` otherwise.
    """

    name: str
    kind: str
    axis: int = 0
    modality: int | None = None

    def prefixed(self, prefix: str) -> RowTable:
        """The same table named from a parent module (``prefix.name``)."""
        return self._replace(name=f"{prefix}.{self.name}" if prefix else self.name)
