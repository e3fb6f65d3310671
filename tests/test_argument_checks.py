"""Every public function of the layers, losses, fusion, metrics and objectives refuses a
misuse with a TypeError/ValueError naming the argument, before torch sees it (no traceback
from inside torch, no silent result, no wrap-around of negative ids)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import cm3_pyg.nn as N
from cm3_pyg import metrics as M
from cm3_pyg.checks import check_ids, check_int, check_number, check_tensor
from cm3_pyg.nn.objectives import BPOLoss, FlipModel, NBPOLoss
from cm3_pyg.unlearning import UnlearningSettings

X = torch.randn(6, 4)
Y = torch.randn(6, 4)
XI = torch.arange(24).view(6, 4)
ADJ = N.to_adjacency(torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]]), None, 4, backend="csr")
PROP = N.UserItemPropagation(2)
NAN = float("nan")

# (call, exception type, a fragment the message must contain)
CASES: dict[str, tuple[Callable[[], object], type[Exception], str]] = {
    "alignment x list": (lambda: N.alignment_loss([1, 2], Y), TypeError, "alignment_loss: x"),
    "alignment int x": (lambda: N.alignment_loss(XI, XI), TypeError, "floating-point"),
    "alignment alpha < 0": (lambda: N.alignment_loss(X, Y, alpha=-1), ValueError, "alpha"),
    "alignment alpha nan": (lambda: N.alignment_loss(X, Y, alpha=NAN), ValueError, "finite"),
    "alignment 1-D": (lambda: N.alignment_loss(X[0], Y[0]), ValueError, "2-D"),
    "uniformity int": (lambda: N.uniformity_loss(XI), TypeError, "uniformity_loss: x"),
    "uniformity 1-D": (lambda: N.uniformity_loss(X[0]), ValueError, "2-D"),
    "uniformity t bool": (lambda: N.uniformity_loss(X, t=True), TypeError, "temperature"),
    "uniformity fractional counts": (
        lambda: N.uniformity_loss(X, counts=torch.full((6,), 1.5)),
        ValueError,
        "whole numbers",
    ),
    "calibrated min > max": (
        lambda: N.calibrated_uniformity_loss(X, N.ClampedCosineSimilarity(Y, 0.9, 0.1)),
        ValueError,
        "min_sim (0.9) must be <= max_sim (0.1)",
    ),
    "calibrated min nan": (
        lambda: N.calibrated_uniformity_loss(X, N.ClampedCosineSimilarity(Y, NAN, 0.1)),
        ValueError,
        "min_sim must be a finite number",
    ),
    "calibrated int sim": (
        lambda: N.calibrated_uniformity_loss(X, torch.ones(6, 6, dtype=torch.long)),
        TypeError,
        "sim",
    ),
    "cosine matrix min > max": (
        lambda: N.cosine_similarity_matrix(X, 0.5, -0.5),
        ValueError,
        "min_sim",
    ),
    "bpr int": (lambda: N.bpr_loss(torch.arange(3), torch.arange(3)), TypeError, "pos_scores"),
    "bpr 2-D positives": (
        lambda: N.bpr_loss(torch.randn(3, 2), torch.randn(3, 5)),
        ValueError,
        "pos_scores must be 1-D",
    ),
    "info_nce temperature str": (
        lambda: N.info_nce_loss(X, Y, "a"),
        TypeError,
        "temperature must be a real number",
    ),
    "info_nce temperature nan": (lambda: N.info_nce_loss(X, Y, NAN), ValueError, "temperature"),
    "info_nce block_rows 2.5": (
        lambda: N.info_nce_loss(X, Y, 1.0, 2.5),
        TypeError,
        "block_rows must be an int",
    ),
    "info_nce mixed dtypes": (lambda: N.info_nce_loss(X, Y.double()), ValueError, "dtype"),
    "gaussian_nll int": (
        lambda: N.gaussian_nll(XI, XI, XI, torch.ones(6)),
        TypeError,
        "gaussian_nll: mu",
    ),
    "slerp int": (lambda: N.slerp(XI, XI, 0.5), TypeError, "slerp: a"),
    "slerp t nan": (lambda: N.slerp(X, Y, NAN), ValueError, "slerp: t"),
    "slerp t 2": (lambda: N.slerp(X, Y, 2.0), ValueError, "in [0, 1]"),
    "slerp t tensor out of range": (
        lambda: N.slerp(X, Y, torch.full((6, 1), -0.5)),
        ValueError,
        "must lie in [0, 1], got -0.5",
    ),
    "slerp t wrong rows": (lambda: N.slerp(X, Y, torch.rand(3, 1)), ValueError, "[6, 1]"),
    "fusion num_modalities 1.5": (
        lambda: N.SphericalBezierFusion(1.5),
        TypeError,
        "num_modalities must be an int",
    ),
    "fusion alpha inf": (lambda: N.SphericalBezierFusion(2, float("inf")), ValueError, "alpha"),
    "fusion xs stacked": (
        lambda: N.SphericalBezierFusion(2)(torch.stack([X, Y])),
        TypeError,
        "list or tuple",
    ),
    "fusion shapes differ": (
        lambda: N.SphericalBezierFusion(2)([X, torch.randn(6, 3)]),
        ValueError,
        "xs[1] has shape [6, 3]",
    ),
    "fusion t wrong rows": (
        lambda: N.SphericalBezierFusion(2)([X, Y], t=torch.rand(3, 1)),
        ValueError,
        "SphericalBezierFusion: t",
    ),
    "fusion int": (lambda: N.SphericalBezierFusion(2)([XI, XI]), TypeError, "xs[0]"),
    "normalize_rows int": (lambda: N.normalize_rows(XI), TypeError, "normalize_rows: x"),
    "normalize_rows 0-d": (lambda: N.normalize_rows(torch.tensor(1.0)), ValueError, "dimension"),
    "normalized_concat tensor": (lambda: N.normalized_concat(X), TypeError, "groups"),
    "normalized_concat int block": (
        lambda: N.normalized_concat([[XI]]),
        TypeError,
        "groups[0][0]",
    ),
    "feature_linear width": (
        lambda: N.feature_linear(X, torch.randn(3, 5)),
        ValueError,
        "needs x with 5 columns",
    ),
    "feature_linear bias": (
        lambda: N.feature_linear(X, torch.randn(3, 4), torch.randn(2)),
        ValueError,
        "bias must have shape [3]",
    ),
    "feature_linear dtypes": (
        lambda: N.feature_linear(X, torch.randn(3, 4, dtype=torch.float64)),
        TypeError,
        "one dtype",
    ),
    "propagation num_layers 1.5": (
        lambda: N.UserItemPropagation(1.5),
        TypeError,
        "num_layers must be an int",
    ),
    "propagation combine": (
        lambda: N.UserItemPropagation(1, "max"),
        ValueError,
        "combine must be one of",
    ),
    "propagation x 1-D": (lambda: PROP(torch.randn(4), ADJ), ValueError, "propagate: x"),
    "propagation x int": (lambda: PROP(XI[:4], ADJ), TypeError, "floating-point"),
    "propagation edge_index out of range": (
        lambda: PROP(torch.randn(4, 3), torch.tensor([[0, 9], [1, 2]])),
        ValueError,
        "node id 9",
    ),
    "propagation negative edge_index": (
        lambda: PROP(torch.randn(4, 3), torch.tensor([[0, -1], [1, 2]])),
        ValueError,
        "node id -1",
    ),
    "propagation float edge_index": (
        lambda: PROP(torch.randn(4, 3), torch.tensor([[0.0, 1], [1, 2]])),
        TypeError,
        "edge_index must be an integer tensor",
    ),
    "propagation edge_weight": (
        lambda: PROP(torch.randn(4, 3), torch.tensor([[0, 1], [1, 2]]), torch.ones(5)),
        ValueError,
        "edge_weight must have shape [2]",
    ),
    "forward_rows negative user": (
        lambda: PROP.forward_rows(torch.randn(4, 3), ADJ, 2, torch.tensor([-1])),
        ValueError,
        "users must lie in [0, 2)",
    ),
    "forward_rows num_users too big": (
        lambda: PROP.forward_rows(torch.randn(4, 3), ADJ, 9, torch.tensor([0])),
        ValueError,
        "num_users (9)",
    ),
    "item graph num_layers -1": (
        lambda: N.propagate_item_graph(torch.randn(4, 3), ADJ, -1),
        ValueError,
        "num_layers must be >= 0",
    ),
    "adjacency propagate num_layers -1": (
        lambda: ADJ.propagate(torch.randn(4, 3), -1),
        ValueError,
        "num_layers must be >= 0",
    ),
    "to_adjacency float index": (
        lambda: N.to_adjacency(torch.tensor([[0.0, 1], [1, 2]]), None, 4),
        TypeError,
        "edge_index",
    ),
    "to_adjacency negative size": (
        lambda: N.to_adjacency(torch.tensor([[0, 1], [1, 2]]), None, -1),
        ValueError,
        "num_rows must be >= 0",
    ),
    "to_adjacency int weight": (
        lambda: N.to_adjacency(torch.tensor([[0, 1], [1, 2]]), torch.ones(2, dtype=torch.long), 4),
        TypeError,
        "edge_weight",
    ),
    "ranking_metrics NaN scores": (
        lambda: M.ranking_metrics(
            torch.tensor([[NAN, 1.0]]), None, torch.tensor([[0], [0]]), ks=[1]
        ),
        ValueError,
        "NaN (first in row 0)",
    ),
    "evaluator NaN embeddings": (
        lambda: M.FullRankingEvaluator(
            2, torch.tensor([[0], [0]]), torch.tensor([[0], [1]]), ks=[1]
        ).evaluate(torch.tensor([[NAN, 1.0]]), torch.ones(2, 2)),
        ValueError,
        "user_emb holds NaN",
    ),
    "objective int scores": (
        lambda: BPOLoss()(torch.arange(3), torch.arange(3)),
        TypeError,
        "pos_scores",
    ),
    "objective reduction": (lambda: BPOLoss("avg"), ValueError, "reduction must be one of"),
    "flip model float ids": (
        lambda: FlipModel(3, 3, 2)(torch.tensor([0.0]), torch.tensor([1])),
        TypeError,
        "flip model: users",
    ),
    "flip model negative item": (
        lambda: FlipModel(3, 3, 2)(torch.tensor([0]), torch.tensor([-1])),
        ValueError,
        "items id -1",
    ),
    "nbpo weight decay nan": (
        lambda: NBPOLoss(3, 3, flip_weight_decay=NAN),
        ValueError,
        "flip_weight_decay",
    ),
    "unlearning alpha str": (
        lambda: UnlearningSettings(alpha="0.5"),
        TypeError,
        "UnlearningSettings: alpha",
    ),
    "unlearning k 0": (lambda: UnlearningSettings(k=0), ValueError, "UnlearningSettings: k"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_misuse_is_refused_with_a_named_argument(case: str) -> None:
    call, error, fragment = CASES[case]
    with pytest.raises(error) as caught:
        call()
    assert fragment in str(caught.value)
    # raised by cm3_pyg's own check, not from inside torch
    assert "cm3_pyg" in caught.traceback[-1].path.as_posix()


def test_the_checks_accept_what_they_should() -> None:
    assert check_number(torch.tensor(0.5), "t", minimum=0, maximum=1) == 0.5
    assert check_int(torch.tensor(3), "k", minimum=1) == 3
    assert check_tensor(X, "x", dims=(1, 2), floating=True) is X
    assert check_ids(torch.tensor([0, 2], dtype=torch.int32), "ids", 3, "user").dtype == torch.long
    # the edges of a closed range are inside, of an open one outside
    assert check_number(1.0, "t", minimum=0, maximum=1) == 1.0
    with pytest.raises(ValueError, match=r"must be > 0, got 0"):
        check_number(0.0, "t", minimum=0, exclusive_minimum=True)


def test_valid_inputs_still_compute_the_same_values() -> None:
    # a 1-D row is one slerp, t as [N] broadcasts like [N, 1]
    t = torch.rand(6)
    torch.testing.assert_close(N.slerp(X, Y, t), N.slerp(X, Y, t[:, None]))
    torch.testing.assert_close(N.slerp(X[2], Y[2], float(t[2])), N.slerp(X, Y, t[:, None])[2])
    fusion = N.SphericalBezierFusion(2).eval()
    torch.testing.assert_close(
        fusion([X, Y]), N.slerp(N.normalize_rows(X), N.normalize_rows(Y), 0.5)
    )
