"""Histogram binning."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from segcal.calibrators._base import BatchSource, Calibrator
from segcal.calibrators._binning import FINE_BINS, accumulate, apply_table, fine_centres


class HistogramBinning(Calibrator):
    r"""Histogram binning: the calibrated probability is the empirical accuracy of the score's bin.

    .. math::
        \hat p(s) = \frac{\#\{i \in B(s) : \text{event}_i\}}{|B(s)|}

    ``mode="top-label"`` (default) bins the top-label confidence c and the event is "prediction correct"; the other
    classes are rescaled to share 1 − ĉ in their original proportions. ``mode="one-vs-rest"`` bins every p_k against
    the event y = k and renormalises the C calibrated values. ``strategy="uniform"`` uses ``n_bins`` equal-width bins
    on p, ``"quantile"`` equal-mass bins; bins are built from a 4000-bin fine histogram of logit(p) (one streaming
    pass), so edges are snapped to that grid. Empty bins leave the score unchanged. Outputs are clamped to
    [1e-6, 1 − 1e-6] so the returned logits stay finite. Top-label mode never changes the argmax: ĉ is floored just
    above the value at which the rescaled runner-up would tie with it (a no-op whenever ĉ is a sane confidence).
    One-vs-rest **can change the argmax** (per-class piecewise-constant maps).

    Args:
        ignore_index: label excluded from fitting.
        n_bins: number of bins.
        strategy: ``"uniform"`` or ``"quantile"``.
        mode: ``"top-label"`` or ``"one-vs-rest"``.

    Shape:
        logits ``(N, C, H, W)``, target ``(N, H, W)``; ``transform`` returns ``(N, C, H, W)`` (log-probabilities).

    Attributes:
        table_ (Tensor): calibrated probability per fine bin, ``(1 or C, 4000)``.

    References:
        Zadrozny & Elkan, "Obtaining calibrated probability estimates from decision trees and naive Bayesian
        classifiers", ICML 2001; Gupta & Ramdas, "Top-label calibration and multiclass-to-binary reductions",
        ICLR 2022, arXiv:2107.08353.

    Example:
        >>> z, y = torch.randn(2, 3, 8, 8) * 3, torch.randint(0, 3, (2, 8, 8))
        >>> HistogramBinning(n_bins=5).fit(z, y).predict_proba(z).sum(1).allclose(torch.ones(2, 8, 8))
        True
    """

    name = "histogram"
    _learned = ("table_",)

    @property
    def preserves_argmax(self) -> bool:  # type: ignore[override]
        return self.mode == "top-label"

    def __init__(self, ignore_index: int | None = 255, *, n_bins: int = 15, strategy: str = "uniform",
                 mode: str = "top-label") -> None:
        self.ignore_index = ignore_index
        self.n_bins = n_bins
        self.strategy = strategy
        self.mode = mode

    def _fit(self, source: BatchSource) -> None:
        if self.strategy not in ("uniform", "quantile"):
            raise ValueError(f"`strategy` must be 'uniform' or 'quantile', got {self.strategy!r}")
        if self.n_bins < 1:
            raise ValueError(f"`n_bins` must be >= 1, got {self.n_bins}")
        counts, pos = accumulate(self, source, self.mode)
        centres_p = 1.0 / (1.0 + np.exp(-fine_centres()))
        table = np.empty_like(counts)
        for k in range(counts.shape[0]):
            if self.strategy == "uniform":
                coarse = np.minimum((centres_p * self.n_bins).astype(np.int64), self.n_bins - 1)
            else:
                cum = np.cumsum(counts[k]) / max(counts[k].sum(), 1.0)
                coarse = np.minimum((cum * self.n_bins - 1e-9).clip(0).astype(np.int64), self.n_bins - 1)
            n_b = np.bincount(coarse, weights=counts[k], minlength=self.n_bins)
            p_b = np.bincount(coarse, weights=pos[k], minlength=self.n_bins)
            acc = np.divide(p_b, n_b, out=np.full(self.n_bins, np.nan), where=n_b > 0)[coarse]
            table[k] = np.where(np.isnan(acc), centres_p, acc)
        self.table_ = torch.from_numpy(table).float()
        assert self.table_.shape[1] == FINE_BINS

    def _transform(self, z: Tensor, images: Tensor | None) -> Tensor:
        return apply_table(z, self.table_, self.mode)
