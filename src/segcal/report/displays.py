"""Display objects: built from computed (binned) statistics, matplotlib imported only inside ``plot``.

Each display follows scikit-learn's ``*Display`` pattern: the constructor stores statistics (never raw pixels), ``plot``
draws them on an optional ``ax`` and returns ``self`` with ``figure_`` / ``ax_`` set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _axes(ax: Any = None, figsize: tuple[float, float] = (4.2, 3.6)) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, dpi=110)
    else:
        fig = ax.figure
    return fig, ax


@dataclass
class ReliabilityDisplay:
    """Reliability diagram from per-bin statistics (``CalibrationMetrics.reliability()``).

    Args:
        edges: ``n_bins + 1`` bin edges on [0, 1].
        counts: pixels per bin.
        confidence: mean top-label confidence per bin (NaN for empty bins).
        accuracy: accuracy per bin (NaN for empty bins).
        label: legend / title text (method name).
        ece: optional ECE to print on the plot.
    """

    edges: Sequence[float]
    counts: Sequence[float]
    confidence: Sequence[float]
    accuracy: Sequence[float]
    label: str = ""
    ece: float | None = None

    @classmethod
    def from_reliability(cls, rel: Mapping[str, Any], label: str = "", ece: float | None = None
                         ) -> ReliabilityDisplay:
        return cls(edges=list(rel["edges"]), counts=list(rel["counts"]), confidence=list(rel["confidence"]),
                   accuracy=list(rel["accuracy"]), label=label, ece=ece)

    def plot(self, ax: Any = None) -> ReliabilityDisplay:
        fig, ax = _axes(ax)
        edges = np.asarray(self.edges, dtype=float)
        counts = np.asarray(self.counts, dtype=float)
        acc = np.nan_to_num(np.asarray(self.accuracy, dtype=float))
        conf = np.asarray(self.confidence, dtype=float)
        width = np.diff(edges)
        centers = edges[:-1] + width / 2
        nonempty = counts > 0
        ax.bar(edges[:-1][nonempty], acc[nonempty], width=width[nonempty], align="edge", color="#4C72B0",
               edgecolor="white", label="accuracy")
        gap_lo = np.minimum(acc, np.nan_to_num(conf, nan=0.0))
        gap = np.abs(np.nan_to_num(conf, nan=0.0) - acc)
        ax.bar(edges[:-1][nonempty], gap[nonempty], bottom=gap_lo[nonempty], width=width[nonempty], align="edge",
               color="#DD8452", alpha=0.55, edgecolor="#DD8452", hatch="//", label="|conf − acc| gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        share = counts / max(counts.sum(), 1.0)
        ax2 = ax.twinx()
        ax2.plot(centers[nonempty], share[nonempty], "o-", color="#55A868", ms=3, lw=1, label="pixel share")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("share of pixels", color="#55A868")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (max softmax)")
        ax.set_ylabel("accuracy")
        title = self.label + (f"  ECE={self.ece:.4f}" if self.ece is not None else "")
        ax.set_title(title, fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(handles + h2, labels + l2, loc="upper left", fontsize=7, frameon=False)
        fig.tight_layout()
        self.figure_, self.ax_ = fig, ax
        return self


@dataclass
class CurveDisplay:
    """ROC or precision-recall curves for several detectors.

    Args:
        curves: ``{name: (x, y)}`` points, e.g. (fpr, tpr) for ROC or (recall, precision) for PR.
        kind: ``"roc"`` or ``"pr"``.
        scores: optional ``{name: AUROC or AP}`` for the legend.
    """

    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]
    kind: str = "roc"
    title: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)

    def plot(self, ax: Any = None) -> CurveDisplay:
        fig, ax = _axes(ax)
        for name, (x, y) in self.curves.items():
            extra = f" ({self.scores[name]:.3f})" if name in self.scores else ""
            ax.plot(x, y, lw=1.4, label=f"{name}{extra}")
        if self.kind == "roc":
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
        else:
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(self.title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right" if self.kind == "roc" else "upper right", frameon=False)
        fig.tight_layout()
        self.figure_, self.ax_ = fig, ax
        return self


@dataclass
class SeverityDisplay:
    """A metric versus corruption severity, one line per corruption (or per method)."""

    series: Mapping[str, Mapping[int, float]]
    metric: str = "ece"
    title: str = ""

    def plot(self, ax: Any = None) -> SeverityDisplay:
        fig, ax = _axes(ax, figsize=(5.0, 3.6))
        for name, by_sev in self.series.items():
            sev = sorted(int(s) for s in by_sev)
            ax.plot(sev, [by_sev[s] if s in by_sev else by_sev[str(s)] for s in sev], "o-", ms=3, lw=1.2,
                    label=name)
        ax.set_xticks(sorted({int(s) for by_sev in self.series.values() for s in by_sev}))
        ax.set_xlabel("corruption severity (0 = clean)")
        ax.set_ylabel(self.metric)
        ax.set_title(self.title, fontsize=9)
        ax.legend(fontsize=7, ncol=2, frameon=False)
        fig.tight_layout()
        self.figure_, self.ax_ = fig, ax
        return self


@dataclass
class PerClassDisplay:
    """Grouped bars of a per-class quantity (e.g. classwise ECE) for several methods."""

    values: Mapping[str, Sequence[float]]
    class_names: Sequence[str]
    metric: str = "per-class ECE"
    title: str = ""

    def plot(self, ax: Any = None) -> PerClassDisplay:
        fig, ax = _axes(ax, figsize=(7.5, 3.4))
        n = max(len(self.values), 1)
        x = np.arange(len(self.class_names))
        width = 0.8 / n
        for i, (name, vals) in enumerate(self.values.items()):
            ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(np.asarray(vals, dtype=float)), width,
                   label=name)
        ax.set_xticks(x)
        ax.set_xticklabels(self.class_names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(self.metric)
        ax.set_title(self.title, fontsize=9)
        ax.legend(fontsize=7, ncol=min(n, 4), frameon=False)
        fig.tight_layout()
        self.figure_, self.ax_ = fig, ax
        return self
