"""Reliability diagram as a scikit-learn style Display; matplotlib is imported only inside ``plot``.

``ReliabilityDisplay`` is the one reliability plot of segcal (``segcal.report`` re-exports it). It stores per-bin
statistics, never pixels: ``edges``, ``count``, ``confidence``, ``accuracy`` — the keys of
``CalibrationMetrics.reliability()`` and of the ``reliability`` entries of a report's ``results.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import Tensor


def _array(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


class ReliabilityDisplay:
    r"""Per-bin accuracy against confidence, the gap to the diagonal and the share of pixels per bin.

    .. math::
        \mathrm{ECE} = \sum_b \frac{|B_b|}{N}\,|\mathrm{acc}_b - \mathrm{conf}_b|

    Like scikit-learn's ``CalibrationDisplay``: ``__init__`` stores the statistics, ``from_metric`` /
    ``from_predictions`` / ``from_reliability`` build one **and draw it**, ``plot(ax=None)`` draws and returns
    ``self`` with ``figure_`` and ``ax_`` set.

    Args:
        edges: (n_bins + 1,) bin edges on [0, 1].
        count: (n_bins,) pixels per bin.
        confidence: (n_bins,) mean confidence per bin (NaN for empty bins).
        accuracy: (n_bins,) accuracy per bin (NaN for empty bins).
        label: method / model name for the title and legend.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, arXiv:1706.04599.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import torch
        >>> from segcal.metrics import CalibrationMetrics
        >>> m = CalibrationMetrics(3)
        >>> m.update(torch.randn(1, 3, 8, 8), torch.randint(0, 3, (1, 8, 8)))
        >>> d = ReliabilityDisplay.from_metric(m, label="uncalibrated")
        >>> abs(d.ece - float(m.compute()["ece"])) < 1e-12, d.ax_.get_xlabel()
        (True, 'confidence')
    """

    def __init__(self, edges: Any, count: Any, confidence: Any, accuracy: Any, *, label: str | None = None) -> None:
        self.edges, self.count = _array(edges), _array(count)
        self.confidence, self.accuracy = _array(confidence), _array(accuracy)
        self.label = label
        n = len(self.count)
        if self.edges.shape != (n + 1,) or self.confidence.shape != (n,) or self.accuracy.shape != (n,):
            raise ValueError(f"`edges` must have n_bins + 1 entries and `count`, `confidence`, `accuracy` n_bins, got "
                             f"{self.edges.shape}, {self.count.shape}, {self.confidence.shape}, "
                             f"{self.accuracy.shape}")

    @property
    def ece(self) -> float:
        """ECE of the stored bins (NaN without pixels)."""
        n = self.count.sum()
        ok = self.count > 0
        if not n:
            return float("nan")
        return float((self.count[ok] / n * np.abs(self.accuracy[ok] - self.confidence[ok])).sum())

    @classmethod
    def from_reliability(cls, data: Mapping[str, Any], *, label: str | None = None, ax: Any = None
                         ) -> ReliabilityDisplay:
        """Build from a ``reliability()`` dict (tensors, arrays or JSON lists) and draw it.

        ``count`` is the key; ``counts`` (written by results.json files before segcal 0.2) is read as well.
        """
        if "count" not in data and "counts" not in data:
            raise ValueError(f"`data` needs the keys edges, count, confidence, accuracy; got {sorted(data)}")
        count = data["count"] if "count" in data else data["counts"]
        return cls(data["edges"], count, data["confidence"], data["accuracy"], label=label).plot(ax=ax)

    @classmethod
    def from_metric(cls, metric: Any, *, region: str | None = None, label: str | None = None,
                    ax: Any = None) -> ReliabilityDisplay:
        """Build from any metric with ``reliability()`` (``CalibrationMetrics`` or a scalar metric) and draw it.

        Args:
            metric: the updated metric.
            region: ``None`` (all valid pixels), or ``"boundary"`` / ``"interior"`` with ``boundary_width`` set.
            label: title / legend text.
            ax: matplotlib axes (a new figure otherwise).
        """
        rel = metric.reliability(region) if region is not None else metric.reliability()
        return cls.from_reliability(rel, label=label, ax=ax)

    @classmethod
    def from_predictions(cls, preds: Tensor, target: Tensor, *, n_bins: int = 15, ignore_index: int | None = 255,
                         input: str = "logits", label: str | None = None, ax: Any = None) -> ReliabilityDisplay:
        """Build from (N, C, H, W) logits (or probabilities, ``input="probs"``) and (N, H, W) labels; draw it."""
        from segcal.metrics.calibration import CalibrationMetrics

        if not isinstance(preds, Tensor) or preds.ndim != 4:
            shape = tuple(preds.shape) if isinstance(preds, Tensor) else type(preds).__name__
            raise ValueError(f"`preds` must be a (N, C, H, W) tensor, got {shape}")
        m = CalibrationMetrics(int(preds.shape[1]), n_bins=n_bins, ignore_index=ignore_index, input=input,
                               classwise=False)
        m.update(preds, target)
        return cls.from_metric(m, label=label, ax=ax)

    def plot(self, ax: Any = None, *, show_gap: bool = True, show_counts: bool = True) -> ReliabilityDisplay:
        """Draw accuracy bars, the gap to the diagonal and (right axis) the share of pixels per bin.

        Args:
            ax: matplotlib axes; a new 4 x 4 in figure otherwise.
            show_gap: shade ``|confidence - accuracy|`` per bin.
            show_counts: draw the share of pixels per bin on a twin axis.

        Returns:
            ``self``, with ``figure_`` and ``ax_`` set.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(4.0, 4.0), layout="constrained")
        else:
            fig = ax.figure
        left, width = self.edges[:-1], np.diff(self.edges)
        ok = self.count > 0
        acc = np.where(ok, np.nan_to_num(self.accuracy), 0.0)
        conf = np.where(ok, np.nan_to_num(self.confidence), 0.0)
        ax.bar(left[ok], acc[ok], width=width[ok], align="edge", color="#4C72B0", edgecolor="white",
               label="accuracy")
        if show_gap:
            lo = np.minimum(acc, conf)
            ax.bar(left[ok], np.abs(conf - acc)[ok], bottom=lo[ok], width=width[ok], align="edge", color="#DD8452",
                   alpha=0.55, edgecolor="#DD8452", hatch="//", label="|conf − acc| gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        handles, labels = ax.get_legend_handles_labels()
        if show_counts:
            ax2 = ax.twinx()
            share = self.count / max(self.count.sum(), 1.0)
            centers = left + width / 2
            ax2.plot(centers[ok], share[ok], "o-", color="#55A868", ms=3, lw=1, label="share of pixels")
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("share of pixels", color="#55A868")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        title = f"ECE {self.ece:.4f}" if self.label is None else f"{self.label} — ECE {self.ece:.4f}"
        ax.set_title(title, fontsize=9, wrap=True)
        ax.legend(handles, labels, loc="upper left", fontsize=7, frameon=False)
        self.figure_, self.ax_ = fig, ax
        return self
