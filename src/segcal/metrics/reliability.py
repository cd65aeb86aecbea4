"""Reliability diagram: a Display object built from computed statistics; matplotlib is imported only to draw."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor


@dataclass
class ReliabilityDiagram:
    r"""Per-bin accuracy against mean confidence, with the gap to the diagonal.

    .. math::
        \mathrm{ECE} = \sum_b \frac{|B_b|}{N}\,|\mathrm{acc}_b - \mathrm{conf}_b|

    Args:
        edges: (n_bins + 1,) bin edges on [0, 1].
        count: (n_bins,) pixels per bin.
        confidence: (n_bins,) mean confidence per bin (NaN for empty bins).
        accuracy: (n_bins,) accuracy per bin (NaN for empty bins).

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, arXiv:1706.04599.

    Example:
        >>> import torch
        >>> from segcal.metrics import CalibrationMetrics
        >>> m = CalibrationMetrics(3)
        >>> m.update(torch.randn(1, 3, 8, 8), torch.randint(0, 3, (1, 8, 8)))
        >>> d = ReliabilityDiagram.from_metric(m)
        >>> round(d.ece, 6) == round(float(m.compute()["ece"]), 6)
        True
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @classmethod
    def from_reliability(cls, data: dict[str, Tensor]) -> ReliabilityDiagram:
        """Build from the dict returned by ``CalibrationMetrics.reliability()``."""
        def arr(k: str) -> np.ndarray:
            return np.asarray(data[k].detach().cpu().numpy() if isinstance(data[k], Tensor) else data[k],
                              dtype=np.float64)
        return cls(arr("edges"), arr("count"), arr("confidence"), arr("accuracy"))

    @classmethod
    def from_metric(cls, metric: Any, region: str | None = None) -> ReliabilityDiagram:
        """Build from a ``CalibrationMetrics`` instance (optionally its ``"boundary"``/``"interior"`` band)."""
        return cls.from_reliability(metric.reliability(region) if region else metric.reliability())

    @property
    def ece(self) -> float:
        n = self.count.sum()
        ok = self.count > 0
        return float((self.count[ok] / n * np.abs(self.accuracy[ok] - self.confidence[ok])).sum()) if n else np.nan

    def plot(self, ax: Any = None, *, show_gap: bool = True, show_counts: bool = True, label: str | None = None) -> Any:
        """Draw bars of per-bin accuracy, the gap to the diagonal and (twin axis) the bin counts; returns ``ax``."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(4, 4))
        left, width = self.edges[:-1], np.diff(self.edges)
        ok = self.count > 0
        acc = np.where(ok, self.accuracy, 0.0)
        conf = np.where(ok, self.confidence, 0.0)
        ax.bar(left, acc, width=width, align="edge", edgecolor="black", color="tab:blue",
               label=label or f"accuracy (ECE {self.ece:.3f})")
        if show_gap:
            ax.bar(left, conf - acc, bottom=acc, width=width, align="edge", color="tab:red", alpha=0.3,
                   edgecolor="tab:red", label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        if show_counts:
            ax2 = ax.twinx()
            frac = self.count / max(self.count.sum(), 1)
            ax2.step(self.edges[:-1], frac, where="post", color="gray", lw=1)
            ax2.set_ylabel("fraction of pixels")
            ax2.set_ylim(0, 1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left")
        return ax
