"""Multi-run experiments built on :mod:`cm3_pyg.training` (model comparisons over grids)."""

from cm3_pyg.experiments.compare import (
    GRID_MODES,
    REPORTED_METRICS,
    PointSummary,
    RunRecord,
    choose_points,
    coordinate_point,
    grid_points,
    model_grid,
    model_points,
    plot_results,
    point_slug,
    run_comparison,
    select_best,
    summarize,
    write_results,
)

__all__ = [
    "GRID_MODES",
    "REPORTED_METRICS",
    "PointSummary",
    "RunRecord",
    "choose_points",
    "coordinate_point",
    "grid_points",
    "model_grid",
    "model_points",
    "plot_results",
    "point_slug",
    "run_comparison",
    "select_best",
    "summarize",
    "write_results",
]
