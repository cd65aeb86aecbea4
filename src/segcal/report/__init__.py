"""Plots and the self-contained HTML report (matplotlib is imported lazily, only when drawing)."""

from segcal.report.displays import CurveDisplay, PerClassDisplay, ReliabilityDisplay, SeverityDisplay
from segcal.report.html import bootstrap_statement, class_palette, metrics_table, render_report

__all__ = ["CurveDisplay", "PerClassDisplay", "ReliabilityDisplay", "SeverityDisplay", "bootstrap_statement",
           "class_palette", "metrics_table", "render_report"]
