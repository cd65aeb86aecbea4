"""Plots and the self-contained HTML report (matplotlib is imported lazily, only when drawing)."""

from segcal.report.displays import CurveDisplay, PerClassDisplay, ReliabilityDisplay, SeverityDisplay
from segcal.report.html import metrics_table, render_report

__all__ = ["CurveDisplay", "PerClassDisplay", "ReliabilityDisplay", "SeverityDisplay", "metrics_table",
           "render_report"]
