r"""BPR-MF: matrix factorisation trained with Bayesian personalised ranking (Rendle et al., 2009).

Reference followed: MMRec's ``BPR`` model (github.com/enoche/MMRec, ``src/models/bpr.py``):
Xavier-normal ID embeddings, dot-product scores, BPR loss plus ``reg_weight`` times MMRec's
``EmbLoss`` (sum of the un-squared Frobenius norms of the batch's user, positive and
negative embeddings, divided by the batch size). Deliberate deviation: the BPR term is
``-logsigmoid(s+ - s-)`` instead of ``-log(1e-10 + sigmoid(s+ - s-))`` (equal up to the
``1e-10`` guard, but finite and with a non-vanishing gradient for large margins).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import Parameter

from cm3_pyg.models._common import embedding_norm_penalty
from cm3_pyg.models.base import Batch, BatchRows, GraphInputs, Recommender


class BPRMF(Recommender):
    r"""Matrix factorisation: :math:`\hat y_{ui} = \mathbf{p}_u^\top \mathbf{q}_i`.

    Loss of a batch of users :math:`u`, positives :math:`i` and negatives :math:`j`:

    .. math::
        \mathcal{L} = -\frac{1}{B}\sum \log\sigma(\hat y_{ui} - \hat y_{uj})
        + \lambda \frac{\lVert P_u \rVert_F + \lVert Q_i \rVert_F + \lVert Q_j \rVert_F}{B}

    The ranking term is the model's objective (BPR by default; ``objective: bpo | nbpo``
    swaps it). ID-only: it reads no features and no graph.

    Args:
        num_users: ``U``.
        num_items: ``I``.
        embedding_dim: ``d``.
        reg_weight: :math:`\lambda`.
        init_scheme: ``"xavier_normal"`` (MMRec) or ``"uniform"``, :math:`U[0, 1)/\sqrt{d}`
            (the NBPO code's).
    """

    name = "bprmf"
    min_modalities = 0
    uses_item_graph = False
    INIT_SCHEMES = ("xavier_normal", "uniform")
    hyperparameter_choices: ClassVar[dict[str, tuple[str, ...]]] = {"init_scheme": INIT_SCHEMES}

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int = 64,
        reg_weight: float = 1e-3,
        init_scheme: str = "xavier_normal",
    ) -> None:
        super().__init__()
        self.init_scheme = init_scheme
        self.num_users = num_users
        self.num_items = num_items
        self.embedding_dim = embedding_dim
        self.reg_weight = reg_weight
        self.user_embedding = Parameter(torch.empty(num_users, embedding_dim))
        self.item_embedding = Parameter(torch.empty(num_items, embedding_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in (self.user_embedding, self.item_embedding):
            if self.init_scheme == "uniform":  # NBPO's code: U[0, 1) / sqrt(d)
                with torch.no_grad():
                    table.uniform_(0.0, 1.0).div_(self.embedding_dim**0.5)
            else:
                torch.nn.init.xavier_normal_(table)

    def forward(self) -> tuple[Tensor, Tensor]:
        """``(user [U, d], item [I, d])`` embeddings."""
        return self.user_embedding, self.item_embedding

    def batch_rows(self, inputs: GraphInputs, batch: Batch) -> BatchRows:
        user_emb, item_emb = self()
        return BatchRows.gather(user_emb, item_emb, batch)

    def regularization(self, batch: Batch, rows: BatchRows) -> Tensor:
        """``reg_weight`` times MMRec's ``EmbLoss`` of the batch's rows."""
        return self.reg_weight * embedding_norm_penalty(rows.user, rows.pos, rows.neg)

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        return self()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_users={self.num_users}, num_items={self.num_items}, "
            f"embedding_dim={self.embedding_dim}, reg_weight={self.reg_weight}, "
            f"init_scheme={self.init_scheme!r})"
        )
