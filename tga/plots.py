"""Every figure function under one name, for callers outside the workflow (the CLI).

The figures live in :mod:`tga.figures_model` (one model), :mod:`tga.figures_compare`
(across variants and seeds) and :mod:`tga.figures_evolution` (across training), with
their shared style in :mod:`tga.figure_style`. Workflow rules and scripts import those
modules directly, never this one: a rule's code fingerprint follows its imports, and
importing all figures here would make every figure edit rerun every figure rule.
"""

from __future__ import annotations

from tga.figure_style import METRIC_LABELS, metric_label
from tga.figures_compare import plot_differences, plot_perplexity, plot_similarity_by_layer
from tga.figures_evolution import (
    EVOLUTION_METRICS,
    plot_heatmaps_before_after,
    plot_metrics_by_step,
    plot_similarity_change,
)
from tga.figures_model import plot_geometry_layers, plot_similarity_heatmaps, plot_training_curves

__all__ = [
    "METRIC_LABELS",
    "metric_label",
    "plot_geometry_layers",
    "plot_similarity_heatmaps",
    "plot_training_curves",
    "plot_similarity_by_layer",
    "plot_differences",
    "plot_perplexity",
    "EVOLUTION_METRICS",
    "plot_metrics_by_step",
    "plot_heatmaps_before_after",
    "plot_similarity_change",
]
