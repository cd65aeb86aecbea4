"""Display objects: built from computed (binned) statistics, matplotlib imported only inside ``plot``.

Each display follows scikit-learn's ``*Display`` pattern: the constructor stores statistics (never raw pixels), ``plot``
draws them on an optional ``ax`` and returns ``self`` with ``figure_`` / ``ax_`` set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segcal.metrics.reliability import ReliabilityDisplay

__all__ = ["CurveDisplay", "PerClassDisplay", "ReliabilityDisplay", "SeverityDisplay"]


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
